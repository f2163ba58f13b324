//! The policy in force, compiled for the request path: routes with their targets resolved to
//! upstreams and metric handles. Built once per policy version and swapped in whole through
//! one `ArcSwap`, so a request sees one consistent policy from start to finish.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::Arc;

use outrider_config::{
    Discovery, LoadedPolicy, MeshTls, Policy, Protocol, RateLimit, Service, ServiceTls,
};

use crate::http::authz::Authorizer;
use crate::http::mirror::Mirror;
use crate::http::route_filter::RouteFilters;
use crate::http::route_index::RouteIndex;
use crate::http::route_match::{CompiledMatch, RouteRequest};
use crate::io::identity::{Mesh, ALPN_H2, ALPN_HTTP1, ALPN_OUTRIDER, ALPN_OUTRIDER_TCP};
use crate::io::tls::UpstreamTls;
use crate::io::upstream::{Upstream, UpstreamSpec};
use crate::policy::breaker::CircuitBreaker;
use crate::policy::ratelimit::RateLimiter;
use crate::policy::{Limit, RoutePolicy, Stateful};
use crate::telemetry::metrics::{Metrics, RouteMetrics};
use crate::telemetry::routing::{FilterKinds, RouteSeries};
use crate::telemetry::{AccessLog, AccessLogStyle};
use crate::trace::Sampler;

/// Where a matched request goes: an upstream, and the metrics it is counted in.
pub struct Target {
    /// The service.
    pub upstream: Arc<Upstream>,
    /// Counters for this direction/service/route; an exchange's `Finish` holds them until
    /// its response body ends.
    pub metrics: Arc<RouteMetrics>,
    /// Timeouts, retries and limits for this service on this route.
    pub policy: RoutePolicy,
    /// The matched route's template for spans' `http.route`: its path prefix and `*` (`/*`
    /// when it matches any path); none for targets no route chose (inbound, dedicated ports,
    /// captured destinations).
    pub http_route: Option<Arc<str>>,
    /// The route's `request_mirror` filters, shared by its backends; `None` for most.
    pub mirrors: Option<Arc<[Mirror]>>,
}

enum Backends {
    One(Arc<Target>),
    /// Legs with the running total of weights at their end; a random number below `total`
    /// picks the first leg whose end exceeds it.
    Split {
        legs: Vec<(u64, Arc<Target>)>,
        total: u64,
    },
}

impl Backends {
    fn pick(&self) -> &Arc<Target> {
        match self {
            Self::One(t) => t,
            Self::Split { legs, total } => {
                let ticket = fastrand::u64(..*total);
                let i = legs.partition_point(|(end, _)| *end <= ticket);
                &legs[i.min(legs.len() - 1)].1
            }
        }
    }
}

/// One match of a route, in the route table: the route's backends by their index in
/// `Snapshot::backends`, and its filters (compiled per match: a prefix rewrite replaces the
/// prefix this match took).
struct TableEntry {
    matcher: CompiledMatch,
    backends: usize,
    filters: Option<Arc<RouteFilters>>,
    /// Requests that met this match (`outrider_route_decisions_total`).
    decided: Option<prometheus::IntCounter>,
}

/// A routed request: the target picked, and the filters of the match it met.
pub type Routed<'s> = (&'s Arc<Target>, Option<&'s Arc<RouteFilters>>);

/// The compiled policy.
pub struct Snapshot {
    /// Monotonic version of this policy in this proxy.
    pub version: u64,
    /// Hash of the policy text.
    pub content_hash: String,
    /// The policy as written (validated).
    pub policy: Policy,
    /// Metrics of requests no route matched.
    pub unrouted: Arc<RouteMetrics>,
    /// `outrider_route_decisions_total` of requests no route took.
    unrouted_decisions: prometheus::IntCounter,
    /// How new traces are sampled.
    pub sampler: Sampler,
    /// The access-log writer, when this policy logs (set by the reload that installs it).
    pub access_log: Option<Arc<AccessLog>>,
    /// How this policy's access-log lines are written.
    pub access_log_style: AccessLogStyle,
    /// Every match of every route, in precedence order (computed once per load): the first
    /// entry a request meets is its route.
    table: Vec<TableEntry>,
    /// The entries of `table` each host can meet.
    index: RouteIndex,
    /// Each route's series (route and filter decisions, mirrors), held while this policy is.
    _route_series: Vec<Arc<RouteSeries>>,
    /// Each route's backends, by the route's position among the routes compiled.
    backends: Vec<Backends>,
    dedicated: HashMap<SocketAddr, Arc<Target>>,
    /// Transparent capture: the service each known address belongs to (its `addresses` and
    /// static endpoints), matched once per reload.
    by_address: HashMap<SocketAddr, Arc<Target>>,
    /// Services whose endpoints change between reloads (found by `dns:`, or pushed by the
    /// control plane's registry): their addresses now are looked at per connection.
    by_live_endpoints: Vec<Arc<Target>>,
    /// Service names by the host names they answer to (`dns:` hosts and origination SNIs), to
    /// class captured TLS by its SNI in metrics.
    by_host: HashMap<String, Arc<str>>,
    /// Metrics of captured requests to destinations in no service.
    passthrough_metrics: Arc<RouteMetrics>,
    /// Metrics of captured inbound requests (`app`, as for `inbound.app`).
    inbound_metrics: Arc<RouteMetrics>,
    inbound: Option<Arc<Target>>,
    /// `inbound.authorization`, compiled.
    authorization: Option<Authorizer>,
    upstreams: BTreeMap<String, Arc<Upstream>>,
    /// Limiters and breakers by service, route name and for inbound, kept for the next reload.
    service_state: BTreeMap<String, Stateful>,
    route_state: HashMap<String, Stateful>,
    inbound_state: Stateful,
}

/// Label of the direction of outbound requests.
pub const OUTBOUND: &str = "outbound";
/// Label of the direction of inbound requests.
pub const INBOUND: &str = "inbound";
/// Service and route label of requests no route matched. Placeholder labels start with ':',
/// which policy names cannot hold (`config/` allows letters, digits, '-', '.', '_'), so they
/// never share a series with a real service or route.
pub const UNROUTED: &str = ":unrouted";
/// Route label of requests on a service's dedicated listener (`listen`).
pub const DEDICATED_ROUTE: &str = ":listen";
/// Route label of captured requests sent to a service by their destination address.
pub const ADDRESS_ROUTE: &str = ":address";

/// Service (and route) label of captured requests and connections to a destination that
/// belongs to no service of the policy.
pub const PASSTHROUGH: &str = "passthrough";
/// Connect timeout to a passthrough destination: an address outside the policy may be far
/// away (another region, the internet), so longer than a service's 1 s default.
pub const PASSTHROUGH_CONNECT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

impl Snapshot {
    /// Replaces the endpoint set of `service`, a `discovery: registry` service, with the
    /// addresses the control plane pushed: only that service's upstream changes, and its
    /// endpoints that stay keep their pools and health. `false` (nothing changes) when the
    /// policy has no such registry service.
    pub fn set_registered_endpoints(&self, service: &str, addresses: &[SocketAddr]) -> bool {
        let registry = self
            .policy
            .services
            .get(service)
            .is_some_and(|s| s.discovery == Some(Discovery::Registry));
        match self.upstreams.get(service) {
            Some(upstream) if registry => {
                upstream.set_endpoints(addresses);
                true
            }
            _ => false,
        }
    }

    /// Compiles `loaded` as version `version`. Must run inside the Tokio runtime (DNS services
    /// start their resolver task).
    ///
    /// `previous` is the snapshot being replaced, if any: a service whose settings did not
    /// change keeps its upstream (connection pools, DNS task, endpoint health) and its policy
    /// state, so a reload neither drops warm connections nor resets an open breaker.
    pub fn build(
        loaded: LoadedPolicy,
        version: u64,
        metrics: &Metrics,
        previous: Option<&Snapshot>,
    ) -> Self {
        Self::build_with_mesh(loaded, version, metrics, previous, None)
    }

    /// [`Snapshot::build`] for a proxy with a mesh identity: services marked `tls: mesh` (all
    /// of them under `mesh_tls: strict`) get their client TLS config here, once per load.
    pub fn build_with_mesh(
        loaded: LoadedPolicy,
        version: u64,
        metrics: &Metrics,
        previous: Option<&Snapshot>,
        mesh: Option<&Arc<Mesh>>,
    ) -> Self {
        let LoadedPolicy {
            policy,
            content_hash,
        } = loaded;
        let mut upstreams = BTreeMap::new();
        for (name, service) in &policy.services {
            let meshed = is_meshed(service, policy.mesh_tls);
            let kept = previous.and_then(|p| {
                let before = p.policy.services.get(name)?;
                let was_meshed = is_meshed(before, p.policy.mesh_tls);
                (same_upstream(before, service) && was_meshed == meshed)
                    .then(|| p.upstreams.get(name).cloned())?
            });
            if let Some(upstream) = kept {
                upstreams.insert(name.clone(), upstream);
                continue;
            }
            let spec = UpstreamSpec {
                name: Arc::from(name.as_str()),
                protocol: service.protocol,
                balancing: service.load_balancing.clone(),
                connect_timeout: service.timeouts.connect.get(),
                outlier: service.outlier_detection.clone(),
                max_pending: service
                    .circuit_breaker
                    .as_ref()
                    .and_then(|b| b.max_pending_requests),
                tls: match service.tls.as_ref().and_then(ServiceTls::origination) {
                    Some(tls) => Some(origination_tls(name, service.protocol, tls, mesh)),
                    None => meshed.then(|| upstream_tls(name, service, mesh)),
                },
            };
            // Rebuilt (its settings changed): endpoints that stay keep their hold-outs.
            let before = previous.and_then(|p| p.upstreams.get(name));
            let registered;
            let static_endpoints = if service.discovery == Some(Discovery::Registry) {
                // The addresses pushed so far, until the control plane pushes the next set.
                let was_registry = previous
                    .and_then(|p| p.policy.services.get(name))
                    .is_some_and(|s| s.discovery == Some(Discovery::Registry));
                registered = before
                    .filter(|_| was_registry)
                    .map(|u| u.endpoint_addrs())
                    .unwrap_or_default();
                &registered[..]
            } else {
                service.endpoints.as_deref().unwrap_or(&[])
            };
            let upstream = Upstream::new(spec, static_endpoints, metrics, before.map(|u| &**u));
            if let Some(dns) = &service.dns {
                upstream.spawn_dns_refresh(dns.clone());
            }
            upstreams.insert(name.clone(), upstream);
        }
        let service_state: BTreeMap<String, Stateful> = policy
            .services
            .iter()
            .map(|(name, service)| {
                let before = previous.and_then(|p| p.service_state.get(name));
                let breaker = service.circuit_breaker.as_ref().map(|config| {
                    let kept = before
                        .and_then(|b| b.breaker.as_ref())
                        .filter(|b| b.config() == config);
                    kept.cloned().unwrap_or_else(|| {
                        let breaker = CircuitBreaker::new(Arc::from(name.as_str()), config)
                            .with_metrics(metrics.breaker(name));
                        Arc::new(breaker)
                    })
                });
                let state = Stateful {
                    limit: limit(
                        service.rate_limit.as_ref(),
                        || format!("service {name}"),
                        before,
                    ),
                    breaker,
                };
                (name.clone(), state)
            })
            .collect();
        let no_state = Stateful::default();
        let target = |service: &str,
                      route: Option<(&outrider_config::Route, &Option<Arc<[Mirror]>>)>,
                      route_state: &Stateful,
                      label: &str|
         -> Option<Arc<Target>> {
            let (route, mirrors) = route.unzip();
            let upstream = upstreams.get(service)?;
            Some(Arc::new(Target {
                upstream: Arc::clone(upstream),
                metrics: metrics.route(OUTBOUND, service, label),
                policy: RoutePolicy::new(
                    policy.services.get(service),
                    route,
                    service_state.get(service).unwrap_or(&no_state),
                    route_state,
                ),
                http_route: route.map(http_route),
                mirrors: mirrors.cloned().flatten(),
            }))
        };
        // Each route's backends by its index in the policy; `None` for a route left out.
        let mut route_backends: Vec<Option<usize>> = Vec::with_capacity(policy.routes.len());
        let mut backends = Vec::with_capacity(policy.routes.len());
        let mut route_state = HashMap::with_capacity(policy.routes.len());
        let mut route_series = Vec::with_capacity(policy.routes.len());
        for (i, route) in policy.routes.iter().enumerate() {
            // An unnamed route is labelled by its position, with the placeholder ':' so a
            // route named `route-0` keeps its own series.
            let name = outrider_config::matching::route_label(route, i).into_owned();
            let before = previous.and_then(|p| p.route_state.get(&name));
            let state = Stateful {
                limit: limit(
                    route.rate_limit.as_ref(),
                    || format!("route {name}"),
                    before,
                ),
                breaker: None,
            };
            route_backends.push(None);
            let series = metrics.routing.route(&name);
            let mirrors = mirrors(route, &series, &upstreams, metrics);
            route_series.push(series);
            let with = Some((route, &mirrors));
            // Validation guarantees every referenced service exists and weights are > 0.
            let compiled = match (&route.service, &route.split) {
                (Some(service), _) => match target(service, with, &state, &name) {
                    Some(t) => Backends::One(t),
                    None => continue,
                },
                (None, Some(split)) => {
                    let mut total = 0u64;
                    let mut legs = Vec::with_capacity(split.len());
                    for leg in split {
                        if let Some(t) = target(&leg.service, with, &state, &name) {
                            total += u64::from(leg.weight);
                            legs.push((total, t));
                        }
                    }
                    if legs.is_empty() || total == 0 {
                        continue;
                    }
                    Backends::Split { legs, total }
                }
                (None, None) => continue,
            };
            route_backends[i] = Some(backends.len());
            backends.push(compiled);
            route_state.insert(name, state);
        }
        let table = route_table(&policy.routes, &route_backends, &route_series);
        let index = RouteIndex::new(table.iter().map(|entry| entry.matcher.authority()));
        let dedicated = policy
            .services
            .iter()
            .filter_map(|(name, s)| {
                Some((s.listen?, target(name, None, &no_state, DEDICATED_ROUTE)?))
            })
            .collect();
        let mut by_address = HashMap::new();
        let mut by_live_endpoints = Vec::new();
        let mut by_host = HashMap::new();
        let address_targets = policy
            .services
            .iter()
            .filter_map(|(name, s)| Some((name, s, target(name, None, &no_state, ADDRESS_ROUTE)?)));
        let mut endpoint_owners = Vec::new();
        for (name, service, target) in address_targets {
            // `addresses` are one service's only (validated); an endpoint two services share
            // goes to the first by name.
            for addr in &service.addresses {
                by_address.insert(*addr, Arc::clone(&target));
            }
            for addr in service.endpoints.iter().flatten() {
                endpoint_owners.push((*addr, Arc::clone(&target)));
            }
            if service.dns.is_some() || service.discovery == Some(Discovery::Registry) {
                by_live_endpoints.push(Arc::clone(&target));
            }
            if let Some(dns) = &service.dns {
                let host = dns.rsplit_once(':').map_or(dns.as_str(), |(host, _)| host);
                by_host
                    .entry(host.to_ascii_lowercase())
                    .or_insert_with(|| Arc::from(name.as_str()));
            }
            if let Some(tls) = service.tls.as_ref().and_then(ServiceTls::origination) {
                by_host
                    .entry(tls.sni.to_ascii_lowercase())
                    .or_insert_with(|| Arc::from(name.as_str()));
            }
        }
        for (addr, target) in endpoint_owners {
            by_address.entry(addr).or_insert(target);
        }
        let inbound_state = Stateful {
            limit: limit(
                policy.inbound.as_ref().and_then(|i| i.rate_limit.as_ref()),
                || "inbound".to_string(),
                previous.map(|p| &p.inbound_state),
            ),
            breaker: None,
        };
        let inbound = policy.inbound.as_ref().map(|inbound| {
            let kept = previous.and_then(|p| {
                let before = p.policy.inbound.as_ref()?;
                let same = before.app == inbound.app
                    && before.protocol == inbound.protocol
                    && before.timeouts.connect == inbound.timeouts.connect;
                same.then(|| p.inbound.as_ref().map(|t| Arc::clone(&t.upstream)))?
            });
            let upstream = kept.unwrap_or_else(|| {
                let spec = UpstreamSpec {
                    name: Arc::from("app"),
                    protocol: inbound.protocol,
                    balancing: outrider_config::LoadBalancing::RoundRobin,
                    connect_timeout: inbound.timeouts.connect.get(),
                    outlier: None,
                    max_pending: None,
                    tls: None,
                };
                Upstream::new(spec, &[inbound.app], metrics, None)
            });
            Arc::new(Target {
                upstream,
                metrics: metrics.route(INBOUND, "app", "inbound"),
                policy: RoutePolicy::inbound(
                    inbound_state.limit.clone(),
                    inbound.timeouts.request_body_idle.get(),
                ),
                http_route: None,
                mirrors: None,
            })
        });
        let authorization = policy
            .inbound
            .as_ref()
            .and_then(|i| i.authorization.as_ref())
            .map(|config| {
                Authorizer::compile(config, &metrics.authz).unwrap_or_else(|error| {
                    // Only a policy that skipped validation gets here: fail closed.
                    tracing::error!(%error, "inbound.authorization left uncompiled; denying every inbound request");
                    Authorizer::deny_all(&metrics.authz)
                })
            });
        let sampler = Sampler::parent_based(policy.tracing.as_ref().map_or(1.0, |t| t.ratio));
        let access_log_style = AccessLogStyle::of(&policy.access_log);
        let inbound_metrics = match &inbound {
            Some(target) => Arc::clone(&target.metrics),
            None => metrics.route(INBOUND, "app", "inbound"),
        };
        Self {
            by_address,
            by_live_endpoints,
            by_host,
            passthrough_metrics: metrics.route(OUTBOUND, PASSTHROUGH, PASSTHROUGH),
            inbound_metrics,
            version,
            content_hash,
            policy,
            unrouted: metrics.route(OUTBOUND, UNROUTED, UNROUTED),
            unrouted_decisions: metrics.routing.unrouted.clone(),
            sampler,
            table,
            index,
            _route_series: route_series,
            backends,
            dedicated,
            inbound,
            authorization,
            upstreams,
            service_state,
            route_state,
            inbound_state,
            access_log: None,
            access_log_style,
        }
    }

    /// `inbound.authorization`, compiled, when the policy has it.
    pub fn authorization(&self) -> Option<&Authorizer> {
        self.authorization.as_ref()
    }

    /// Metrics of inbound requests (`app`), for those refused before they have a target.
    pub fn inbound_metrics(&self) -> &Arc<RouteMetrics> {
        &self.inbound_metrics
    }

    /// The target of an outbound request: the route of the first match in precedence order
    /// that `request` meets.
    pub fn route(&self, request: &RouteRequest<'_>) -> Option<&Arc<Target>> {
        self.route_filtered(request).map(|(target, _)| target)
    }

    /// [`Snapshot::route`], with the filters of the match the request met; counted by route
    /// and match (`:unrouted` when none).
    pub fn route_filtered(&self, request: &RouteRequest<'_>) -> Option<Routed<'_>> {
        let entry = self.select(request);
        if entry.is_none() {
            self.unrouted_decisions.inc();
        }
        entry.map(|entry| self.routed(entry))
    }

    /// The first entry in precedence order that `request` meets, among those its host can.
    /// The index gives only entries naming the request's host or none, so their authority is
    /// not compared again.
    fn select(&self, request: &RouteRequest<'_>) -> Option<&TableEntry> {
        self.index
            .candidates(request.host)
            .filter_map(|position| self.table.get(position))
            .find(|entry| entry.matcher.matches_beside_authority(request))
    }

    fn routed<'s>(&'s self, entry: &'s TableEntry) -> Routed<'s> {
        crate::telemetry::routing::count(entry.decided.as_ref());
        (self.backends[entry.backends].pick(), entry.filters.as_ref())
    }

    /// The target of a captured outbound request by a match that names an authority: matches
    /// without one (catch-alls) are for explicit traffic only, or every captured call would go
    /// to them instead of where it was going.
    pub fn route_by_authority(&self, request: &RouteRequest<'_>) -> Option<&Arc<Target>> {
        self.route_by_authority_filtered(request)
            .map(|(target, _)| target)
    }

    /// [`Snapshot::route_by_authority`], with the filters of the match the request met.
    pub fn route_by_authority_filtered(&self, request: &RouteRequest<'_>) -> Option<Routed<'_>> {
        self.index
            .naming(request.host)
            .iter()
            .filter_map(|&position| self.table.get(usize::try_from(position).ok()?))
            .find(|entry| entry.matcher.matches_beside_authority(request))
            .map(|entry| self.routed(entry))
    }

    /// The service a captured connection's original destination belongs to: one of its
    /// `addresses` or static endpoints (a map built per reload), or an address its `dns:` name
    /// resolves to now or the registry last pushed for it. Called once per connection (and
    /// after a reload), not per request.
    pub fn service_for(&self, dst: SocketAddr) -> Option<&Arc<Target>> {
        self.by_address.get(&dst).or_else(|| {
            self.by_live_endpoints
                .iter()
                .find(|target| target.upstream.has_endpoint(dst))
        })
    }

    /// The service a TLS server name belongs to (its `dns:` host or origination SNI).
    pub fn service_for_host(&self, host: &str) -> Option<&Arc<str>> {
        self.by_host.get(&host.to_ascii_lowercase())
    }

    /// A target forwarding to `dst` as it is, with no policy: a captured call to a destination
    /// in no service. Its own upstream (one pool), made per captured connection.
    pub fn passthrough(
        &self,
        dst: SocketAddr,
        protocol: Protocol,
        metrics: &Metrics,
    ) -> Arc<Target> {
        let spec = UpstreamSpec {
            name: Arc::from(PASSTHROUGH),
            protocol,
            balancing: outrider_config::LoadBalancing::RoundRobin,
            connect_timeout: PASSTHROUGH_CONNECT_TIMEOUT,
            outlier: None,
            max_pending: None,
            tls: None,
        };
        Arc::new(Target {
            upstream: Upstream::single(spec, dst, PASSTHROUGH, metrics),
            metrics: Arc::clone(&self.passthrough_metrics),
            policy: RoutePolicy::default(),
            http_route: None,
            mirrors: None,
        })
    }

    /// A target forwarding a captured inbound connection to its original destination (the
    /// pod's address and the app's port), under the inbound policy in force (rate limit,
    /// request-body idle timeout, connect timeout). Made per captured connection.
    pub fn captured_inbound(
        &self,
        dst: SocketAddr,
        protocol: Protocol,
        metrics: &Metrics,
    ) -> Arc<Target> {
        let inbound = self.policy.inbound.as_ref();
        let timeouts = inbound.map(|i| i.timeouts.clone()).unwrap_or_default();
        let spec = UpstreamSpec {
            name: Arc::from("app"),
            protocol,
            balancing: outrider_config::LoadBalancing::RoundRobin,
            connect_timeout: timeouts.connect.get(),
            outlier: None,
            max_pending: None,
            tls: None,
        };
        Arc::new(Target {
            upstream: Upstream::single(spec, dst, "app", metrics),
            metrics: Arc::clone(&self.inbound_metrics),
            policy: RoutePolicy::inbound(
                self.inbound_state.limit.clone(),
                timeouts.request_body_idle.get(),
            ),
            http_route: None,
            mirrors: None,
        })
    }

    /// The target of the dedicated listener configured at `listen`.
    pub fn dedicated(&self, listen: SocketAddr) -> Option<&Arc<Target>> {
        self.dedicated.get(&listen)
    }

    /// The local app behind the inbound listener.
    pub fn inbound(&self) -> Option<&Arc<Target>> {
        self.inbound.as_ref()
    }

    /// Dedicated listen addresses, by service name.
    pub fn dedicated_listeners(&self) -> Vec<(String, SocketAddr)> {
        self.policy
            .services
            .iter()
            .filter_map(|(name, s)| Some((name.clone(), s.listen?)))
            .collect()
    }

    /// Brings every breaker's exported state up to date (an open breaker whose time is up
    /// turns half-open when next looked at); the admin port calls it before a scrape.
    pub fn refresh_breakers(&self) {
        for breaker in self
            .service_state
            .values()
            .filter_map(|s| s.breaker.as_ref())
        {
            let _ = breaker.state();
        }
    }

    /// The upstream of a service, by name.
    pub fn upstream(&self, name: &str) -> Option<&Arc<Upstream>> {
        self.upstreams.get(name)
    }
}

/// Every match of the routes compiled (`backends[i]` is `routes[i]`'s, `None` for a route left
/// out), in precedence order. A match that does not compile, or whose route's filters do not
/// (validation checks the same, so neither happens), is left out: it matches nothing.
fn route_table(
    routes: &[outrider_config::Route],
    backends: &[Option<usize>],
    series: &[Arc<RouteSeries>],
) -> Vec<TableEntry> {
    outrider_config::matching::order(routes)
        .into_iter()
        .filter_map(|at| {
            let route = &routes[at.route];
            let m = route.each_match().nth(at.index)?;
            let backends = (*backends.get(at.route)?)?;
            let series = series.get(at.route);
            let filters = match RouteFilters::compile(route, m) {
                Ok(filters) => filters.map(|mut filters| {
                    if let Some(series) = series {
                        // Mirrors count in their own filter (`mirrors`).
                        let kinds = FilterKinds {
                            mirror: false,
                            ..filter_kinds(route)
                        };
                        filters.counts = series.filter_counts(kinds);
                    }
                    Arc::new(filters)
                }),
                Err(error) => {
                    tracing::error!(route = at.route, %error, "route match left out");
                    return None;
                }
            };
            match CompiledMatch::compile(m) {
                Ok(matcher) => Some(TableEntry {
                    matcher,
                    backends,
                    filters,
                    decided: series.and_then(|s| s.decision(at.index)),
                }),
                Err(error) => {
                    tracing::error!(route = at.route, %error, "route match left out");
                    None
                }
            }
        })
        .collect()
}

/// A route's `request_mirror` filters, each sending to its service's upstream (the same pools
/// as the service's own traffic); `None` when it has none.
fn mirrors(
    route: &outrider_config::Route,
    series: &RouteSeries,
    upstreams: &BTreeMap<String, Arc<Upstream>>,
    metrics: &Metrics,
) -> Option<Arc<[Mirror]>> {
    let mirrors: Vec<Mirror> = route
        .filters
        .iter()
        .filter_map(|filter| match filter {
            outrider_config::RouteFilter::RequestMirror(config) => {
                // Validation guarantees the service exists.
                let upstream = Arc::clone(upstreams.get(&config.service)?);
                let counters = metrics.mirror(&config.service, series);
                let decisions = series.filter_counts(FilterKinds {
                    mirror: true,
                    ..FilterKinds::default()
                });
                Some(Mirror::new(config, upstream, counters).with_decisions(decisions.mirror))
            }
            _ => None,
        })
        .collect();
    (!mirrors.is_empty()).then(|| Arc::from(mirrors))
}

/// Which filters `route` has (mirrors included).
fn filter_kinds(route: &outrider_config::Route) -> FilterKinds {
    use outrider_config::RouteFilter;
    let mut kinds = FilterKinds::default();
    for filter in &route.filters {
        match filter {
            RouteFilter::RequestHeaderModifier(_) => kinds.request_headers = true,
            RouteFilter::ResponseHeaderModifier(_) => kinds.response_headers = true,
            RouteFilter::UrlRewrite(_) => kinds.rewrite = true,
            RouteFilter::RequestRedirect(_) => kinds.redirect = true,
            RouteFilter::RequestMirror(_) => kinds.mirror = true,
        }
    }
    kinds
}

/// The span's `http.route` of a route: the template of its first match's path (`/v1/*`, a
/// regex as written); `/*` when it has no path condition.
fn http_route(route: &outrider_config::Route) -> Arc<str> {
    use outrider_config::matching::PathCondition;
    let path = route.each_match().next().map(PathCondition::of);
    match path.unwrap_or(PathCondition::Any) {
        PathCondition::Any => Arc::from("/*"),
        PathCondition::StrPrefix(prefix) => Arc::from(format!("{prefix}*")),
        PathCondition::SegmentPrefix(prefix) => Arc::from(format!("{prefix}/*")),
        PathCondition::Exact(path) => Arc::from(path),
        PathCondition::Regex(pattern) => Arc::from(pattern),
    }
}

/// The limiter for `config`: the one in `before` when its settings are the same (a drained
/// bucket stays drained across a reload), a full new one otherwise.
fn limit(
    config: Option<&RateLimit>,
    scope: impl FnOnce() -> String,
    before: Option<&Stateful>,
) -> Option<Limit> {
    let config = config?;
    let kept = before
        .and_then(|b| b.limit.as_ref())
        .filter(|l| l.limiter.config() == config);
    Some(kept.cloned().unwrap_or_else(|| Limit {
        limiter: Arc::new(RateLimiter::new(config)),
        scope: Arc::from(scope()),
    }))
}

/// Whether two versions of a service can share one [`Upstream`]: same endpoints (or DNS name),
/// protocol, balancing, connect timeout, outlier detection (endpoint health lives in the
/// upstream) and the pending-connection bound (its counter is shared by the connectors). Everything else is per-request policy.
/// The TLS of a meshed service: ALPN offers the service's own protocol, so the peer's inbound
/// side needs no prior knowledge; the peer must be `identity` when the policy names one.
fn upstream_tls(name: &str, service: &Service, mesh: Option<&Arc<Mesh>>) -> UpstreamTls {
    let Some(mesh) = mesh else {
        tracing::error!(service = name, "mesh TLS asked for but this proxy has no workload identity (--service-account); its requests will fail");
        return UpstreamTls::NoIdentity;
    };
    // The Outrider id first: a peer whose inbound port is captured tells this mesh connection
    // from an app's own TLS by it.
    let alpn = match service.protocol {
        Protocol::Http2 => vec![ALPN_OUTRIDER.to_vec(), ALPN_H2.to_vec()],
        Protocol::Http1 => vec![ALPN_OUTRIDER.to_vec(), ALPN_HTTP1.to_vec()],
    };
    let expected: Option<Arc<str>> = service.identity.as_deref().map(Arc::from);
    let configs = mesh
        .client_config(expected.clone(), alpn)
        .and_then(|config| {
            let opaque = mesh.client_config(expected, vec![ALPN_OUTRIDER_TCP.to_vec()])?;
            Ok((config, opaque))
        });
    match configs {
        Ok((config, opaque)) => UpstreamTls::Mesh {
            config,
            opaque,
            mesh: Arc::clone(mesh),
            identity: service
                .identity
                .as_deref()
                .and_then(|id| http::HeaderValue::from_str(id).ok()),
        },
        Err(error) => {
            // Only a provider without TLS 1.3 could get here; fail closed.
            tracing::error!(service = name, %error, "cannot build the mesh TLS config");
            UpstreamTls::NoIdentity
        }
    }
}

/// Whether a service is reached over mesh mTLS: `tls: mesh`, or `mesh_tls: strict` for every
/// service that is not an external one (`tls: { sni }` has no sidecar to talk mTLS to).
fn is_meshed(service: &Service, mode: MeshTls) -> bool {
    match &service.tls {
        Some(ServiceTls::Mesh) => true,
        Some(ServiceTls::Origination(_)) => false,
        None => mode == MeshTls::Strict,
    }
}

/// The TLS of an external service, built here once per policy load (the CA bundle is read
/// now). A config that cannot be built fails the service's connections with the reason rather
/// than sending its requests unverified or in plaintext.
fn origination_tls(
    name: &str,
    protocol: Protocol,
    tls: &outrider_config::OriginationTls,
    mesh: Option<&Arc<Mesh>>,
) -> UpstreamTls {
    // The mesh's provider when there is one (one set of algorithms per process), else the same
    // aws-lc-rs default.
    let provider = mesh
        .map(|m| Arc::clone(m.provider()))
        .unwrap_or_else(|| Arc::new(rustls::crypto::aws_lc_rs::default_provider()));
    match crate::io::tls::origination(tls, protocol, provider) {
        Ok(tls) => tls,
        Err(error) => {
            tracing::error!(service = name, %error, "cannot build the TLS origination config; its requests will fail");
            UpstreamTls::Unusable(Arc::from(format!(
                "tls origination for service {name} unusable: {error}"
            )))
        }
    }
}

fn same_upstream(before: &Service, after: &Service) -> bool {
    before.identity == after.identity
        && before.tls == after.tls
        && before.endpoints == after.endpoints
        && before.dns == after.dns
        && before.discovery == after.discovery
        && before.protocol == after.protocol
        && before.load_balancing == after.load_balancing
        && before.timeouts.connect == after.timeouts.connect
        && before.outlier_detection == after.outlier_detection
        && max_pending(before) == max_pending(after)
}

fn max_pending(service: &Service) -> Option<u32> {
    service
        .circuit_breaker
        .as_ref()
        .and_then(|b| b.max_pending_requests)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn build(text: &str, previous: Option<&Snapshot>, metrics: &Metrics) -> Snapshot {
        let loaded = outrider_config::load("p.yaml", text).expect("valid policy");
        Snapshot::build(loaded, 1, metrics, previous)
    }

    /// The target of a GET of `path` from `host`, without other headers.
    fn route<'s>(snapshot: &'s Snapshot, host: &str, path: &str) -> Option<&'s Arc<Target>> {
        let req = http::Request::get(path).body(()).expect("request");
        snapshot.route(&RouteRequest::of(host, &req))
    }

    fn route_by_authority<'s>(
        snapshot: &'s Snapshot,
        host: &str,
        path: &str,
    ) -> Option<&'s Arc<Target>> {
        let req = http::Request::get(path).body(()).expect("request");
        snapshot.route_by_authority(&RouteRequest::of(host, &req))
    }

    #[tokio::test]
    async fn pushed_registry_endpoints_change_only_their_service_and_survive_rebuilds() {
        let metrics = Metrics::new("test").expect("metrics");
        let text = "services:\n  pay: { discovery: registry }\n  b: { endpoints: [127.0.0.1:2] }\n";
        let snapshot = build(text, None, &metrics);
        let addr = |s: &str| s.parse::<SocketAddr>().expect("addr");
        let pay = Arc::clone(snapshot.upstream("pay").expect("pay"));
        let b = Arc::clone(snapshot.upstream("b").expect("b"));
        assert!(
            pay.endpoint_addrs().is_empty(),
            "nothing until the first push"
        );
        assert!(
            snapshot.set_registered_endpoints("pay", &[addr("127.0.0.1:7"), addr("127.0.0.1:8")])
        );
        assert_eq!(
            pay.endpoint_addrs(),
            [addr("127.0.0.1:7"), addr("127.0.0.1:8")]
        );
        // An endpoint that stays keeps its pool; the other services are not touched.
        let pool_of = |port: u16| {
            (0..4)
                .map(|_| pay.pick(None).expect("an endpoint"))
                .find(|e| e.addr.port() == port)
                .map(|e| Arc::clone(&e.pool))
                .expect("picked")
        };
        let kept = pool_of(8);
        assert!(
            snapshot.set_registered_endpoints("pay", &[addr("127.0.0.1:8"), addr("127.0.0.1:9")])
        );
        assert!(Arc::ptr_eq(&kept, &pool_of(8)));
        assert!(Arc::ptr_eq(&b, snapshot.upstream("b").expect("b")));
        assert_eq!(b.endpoint_addrs(), [addr("127.0.0.1:2")]);
        // A captured connection to a registered address is the registry service's (its
        // addresses are looked at per connection, as a `dns:` service's are).
        let captured = |dst: &str| {
            snapshot
                .service_for(addr(dst))
                .map(|t| t.upstream.spec.name.to_string())
        };
        assert_eq!(captured("127.0.0.1:9").as_deref(), Some("pay"));
        assert_eq!(captured("127.0.0.1:7"), None, "no longer registered");
        assert_eq!(captured("127.0.0.1:2").as_deref(), Some("b"));
        // Not a registry service, or not in the policy: nothing changes.
        assert!(!snapshot.set_registered_endpoints("b", &[addr("127.0.0.1:7")]));
        assert!(!snapshot.set_registered_endpoints("nope", &[addr("127.0.0.1:7")]));
        assert_eq!(b.endpoint_addrs(), [addr("127.0.0.1:2")]);
        // A reload that rebuilds `pay` (its connect timeout changed) starts from the pushed set.
        let after = build(
            "services:\n  pay: { discovery: registry, timeouts: { connect: 2s } }\n  b: { endpoints: [127.0.0.1:2] }\n",
            Some(&snapshot),
            &metrics,
        );
        let rebuilt = after.upstream("pay").expect("pay");
        assert!(!Arc::ptr_eq(&pay, rebuilt));
        assert_eq!(
            rebuilt.endpoint_addrs(),
            [addr("127.0.0.1:8"), addr("127.0.0.1:9")]
        );
    }

    #[tokio::test]
    async fn unchanged_services_keep_their_upstream_across_a_rebuild() {
        let metrics = Metrics::new("test").expect("metrics");
        let before = build(
            "services:\n  a: { endpoints: [127.0.0.1:1] }\n  b: { endpoints: [127.0.0.1:2] }\ninbound: { app: 127.0.0.1:3 }\n",
            None,
            &metrics,
        );
        // `a` gains a retry policy only (per-request policy); `b` moves to another endpoint.
        let after = build(
            "services:\n  a: { endpoints: [127.0.0.1:1], retries: { attempts: 1 } }\n  b: { endpoints: [127.0.0.1:4] }\ninbound: { app: 127.0.0.1:3 }\n",
            Some(&before),
            &metrics,
        );
        let same = |name: &str| {
            Arc::ptr_eq(
                before.upstream(name).expect("before"),
                after.upstream(name).expect("after"),
            )
        };
        assert!(same("a"), "an unchanged upstream must be kept");
        assert!(!same("b"), "a changed endpoint list needs a new upstream");
        let inbound = |s: &Snapshot| Arc::clone(&s.inbound().expect("inbound").upstream);
        assert!(Arc::ptr_eq(&inbound(&before), &inbound(&after)));
        // Without a previous snapshot everything is new.
        let fresh = build(
            "services:\n  a: { endpoints: [127.0.0.1:1] }\n",
            None,
            &metrics,
        );
        assert!(!Arc::ptr_eq(
            before.upstream("a").expect("before"),
            fresh.upstream("a").expect("fresh")
        ));
    }

    #[tokio::test]
    async fn limiters_carry_over_only_when_their_settings_are_unchanged() {
        let metrics = Metrics::new("test").expect("metrics");
        let policy = |service_rps: u32, route_rps: u32| {
            format!(
                "services:\n  a: {{ endpoints: [127.0.0.1:1], rate_limit: {{ requests_per_second: {service_rps} }} }}\nroutes:\n  - name: r\n    match: {{ path_prefix: /r }}\n    service: a\n    rate_limit: {{ requests_per_second: {route_rps} }}\n  - match: {{ path_prefix: / }}\n    service: a\n"
            )
        };
        let limiter = |s: &Snapshot, path: &str| {
            let target = route(s, "a", path).expect("route");
            Arc::clone(&target.policy.limit.as_ref().expect("limit").limiter)
        };
        let before = build(&policy(5, 7), None, &metrics);
        // The route's own limit overrides the service's.
        assert_eq!(limiter(&before, "/r").config().requests_per_second, 7);
        assert_eq!(limiter(&before, "/x").config().requests_per_second, 5);
        let same = build(&policy(5, 7), Some(&before), &metrics);
        assert!(Arc::ptr_eq(&limiter(&before, "/r"), &limiter(&same, "/r")));
        assert!(Arc::ptr_eq(&limiter(&before, "/x"), &limiter(&same, "/x")));
        let changed = build(&policy(5, 8), Some(&same), &metrics);
        assert!(!Arc::ptr_eq(
            &limiter(&same, "/r"),
            &limiter(&changed, "/r")
        ));
        assert!(Arc::ptr_eq(&limiter(&same, "/x"), &limiter(&changed, "/x")));
    }

    #[tokio::test]
    async fn captured_destinations_map_to_services_by_address_and_authority_routes_only() {
        let metrics = Metrics::new("test").expect("metrics");
        let snapshot = build(
            "services:\n  a: { endpoints: [192.0.2.1:80], addresses: [192.0.2.100:8080] }\n  b: { endpoints: [192.0.2.1:80, 192.0.2.2:80] }\n  ext: { endpoints: [192.0.2.9:443], tls: { sni: api.example.com } }\nroutes:\n  - match: { authority: b.example }\n    service: b\n  - match: { path_prefix: / }\n    service: a\n",
            None,
            &metrics,
        );
        let service = |dst: &str| {
            snapshot
                .service_for(dst.parse().expect("addr"))
                .map(|t| t.upstream.spec.name.to_string())
        };
        assert_eq!(service("192.0.2.100:8080").as_deref(), Some("a"));
        // An endpoint two services share goes to the first by name.
        assert_eq!(service("192.0.2.1:80").as_deref(), Some("a"));
        assert_eq!(service("192.0.2.2:80").as_deref(), Some("b"));
        assert_eq!(service("192.0.2.3:80"), None);
        assert_eq!(
            snapshot.service_for_host("API.example.com").map(|s| &**s),
            Some("ext")
        );
        // The catch-all route is for explicit traffic; a route naming the authority applies.
        let routed = |host: &str| {
            route_by_authority(&snapshot, host, "/x").map(|t| t.upstream.spec.name.to_string())
        };
        assert_eq!(routed("b.example").as_deref(), Some("b"));
        assert_eq!(routed("elsewhere.example"), None);
        assert!(route(&snapshot, "elsewhere.example", "/x").is_some());
        // Passthrough is labelled as such, never by address.
        let dst = "192.0.2.3:80".parse().expect("addr");
        let passthrough = snapshot.passthrough(dst, Protocol::Http1, &metrics);
        assert_eq!(&*passthrough.metrics.labels.service, PASSTHROUGH);
        assert_eq!(passthrough.upstream.endpoint_addrs(), [dst]);
        let inbound = snapshot.captured_inbound(dst, Protocol::Http2, &metrics);
        assert_eq!(&*inbound.metrics.labels.direction, INBOUND);
        assert_eq!(inbound.upstream.spec.protocol, Protocol::Http2);
    }

    #[tokio::test]
    async fn breakers_carry_over_only_when_their_settings_are_unchanged() {
        let metrics = Metrics::new("test").expect("metrics");
        let policy = |failures: u32, timeout: &str| {
            format!(
                "services:\n  a:\n    endpoints: [127.0.0.1:1]\n    timeouts: {{ request: {timeout} }}\n    circuit_breaker: {{ consecutive_failures: {failures} }}\nroutes:\n  - match: {{ authority: a }}\n    service: a\n"
            )
        };
        let breaker = |s: &Snapshot| {
            let target = route(s, "a", "/").expect("route");
            Arc::clone(target.policy.breaker.as_ref().expect("breaker"))
        };
        let before = build(&policy(1, "1s"), None, &metrics);
        // Trip it: an open breaker must stay open across a reload that does not touch it,
        // even when other settings of the service change.
        if let Ok(permit) = breaker(&before).try_acquire() {
            permit.record(crate::policy::breaker::Outcome::Failure);
        }
        let open = crate::policy::breaker::BreakerState::Open;
        assert_eq!(breaker(&before).state(), open);
        let same = build(&policy(1, "2s"), Some(&before), &metrics);
        assert!(Arc::ptr_eq(&breaker(&before), &breaker(&same)));
        assert_eq!(breaker(&same).state(), open);
        let changed = build(&policy(2, "2s"), Some(&same), &metrics);
        assert_eq!(
            breaker(&changed).state(),
            crate::policy::breaker::BreakerState::Closed
        );
    }

    /// Random routes (authorities in any case, every path kind, methods, headers, query
    /// parameters) and random requests: the indexed selection picks exactly the entry a walk
    /// over the whole table in precedence order picks, for explicit and captured traffic.
    #[tokio::test]
    async fn indexed_selection_picks_what_the_linear_walk_picks() {
        let metrics = Metrics::new("test").expect("metrics");
        let mut rng = fastrand::Rng::with_seed(21);
        let hosts = ["a", "b.svc", "C", "d"];
        let paths = ["/", "/x", "/x/y", "/xy", "/x/1", "/y/2/z"];
        let (mut compared, mut routed, mut hostless) = (0, 0, 0);
        for _ in 0..200 {
            let mut text = String::from("services:\n  s: { endpoints: [127.0.0.1:1] }\nroutes:\n");
            for i in 0..rng.usize(1..40) {
                let mut m = Vec::new();
                if rng.bool() {
                    let host = hosts[rng.usize(..hosts.len())];
                    let host = if rng.bool() {
                        host.to_uppercase()
                    } else {
                        host.to_string()
                    };
                    m.push(format!("authority: {host}"));
                }
                match rng.usize(..6) {
                    0 => m.push(format!(
                        "path: {{ exact: {} }}",
                        paths[rng.usize(..paths.len())]
                    )),
                    1 => m.push(format!(
                        "path: {{ prefix: {} }}",
                        paths[rng.usize(..paths.len())]
                    )),
                    2 => m.push(format!("path_prefix: {}", paths[rng.usize(..paths.len())])),
                    3 => m.push("path: { regex: '/x/[0-9]+' }".to_string()),
                    _ => {}
                }
                if rng.u8(..4) == 0 {
                    m.push("method: POST".to_string());
                }
                if rng.u8(..3) == 0 {
                    m.push("headers: [{ name: x-canary, value: 'true' }]".to_string());
                }
                if rng.u8(..4) == 0 {
                    m.push("query_params: [{ name: v, present: true }]".to_string());
                }
                text.push_str(&format!(
                    "  - {{ name: r{i}, service: s, match: {{ {} }} }}\n",
                    m.join(", ")
                ));
            }
            let snapshot = build(&text, None, &metrics);
            for _ in 0..50 {
                let host = hosts[rng.usize(..hosts.len())];
                let host = if rng.bool() {
                    host.to_uppercase()
                } else {
                    host.to_string()
                };
                let mut uri = paths[rng.usize(..paths.len())].to_string();
                if rng.bool() {
                    uri.push_str("?v=1");
                }
                let mut req = http::Request::builder().uri(uri);
                if rng.bool() {
                    req = req.method("POST");
                }
                if rng.bool() {
                    req = req.header("x-canary", "true");
                }
                let req = req.body(()).expect("request");
                let view = RouteRequest::of(&host, &req);
                let linear = snapshot.table.iter().find(|e| e.matcher.matches(&view));
                let indexed = snapshot.select(&view);
                routed += usize::from(indexed.is_some());
                hostless += usize::from(indexed.is_some_and(|e| e.matcher.authority().is_none()));
                assert!(
                    std::ptr::eq(
                        linear.map_or(std::ptr::null(), |e| e),
                        indexed.map_or(std::ptr::null(), |e| e)
                    ),
                    "{host} {:?}\n{text}",
                    req.uri()
                );
                let linear_named = snapshot
                    .table
                    .iter()
                    .find(|e| e.matcher.authority().is_some() && e.matcher.matches(&view))
                    .map(|e| e.backends);
                let captured = snapshot.route_by_authority(&view).map(Arc::as_ptr);
                let expected = linear_named.map(|b| Arc::as_ptr(snapshot.backends[b].pick()));
                assert_eq!(captured, expected, "{host} {:?}\n{text}", req.uri());
                compared += 1;
            }
        }
        assert_eq!(compared, 200 * 50);
        // The cases cover both kinds of routes, and requests no route takes.
        assert!(
            routed > compared / 4 && hostless > compared / 20 && routed < compared,
            "{routed} routed, {hostless} by routes without an authority, of {compared}"
        );
    }
}
