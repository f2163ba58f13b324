//! Per-route visibility: which route (and which of its matches) took each request, or none,
//! and what each of a route's filters did, counted by route name. Handles are resolved once
//! per reload, so the request path adds one atomic per decision.
//!
//! - `outrider_route_decisions_total{route,match}`: a request met match `match` of `route` (the
//!   index `outriderctl get WORKLOAD --routes` prints); `route=":unrouted"`, `match=""`: it met
//!   none on the outbound port (answered 404). A captured request that meets no route keeps
//!   its destination and is not counted here (see `outrider_requests_total{route=":address"}`).
//! - `outrider_route_filter_decisions_total{route,filter,decision}`: a header modifier, rewrite
//!   or redirect `applied` (or `refused`: the rewritten path or Location was no valid target,
//!   answered 400); a mirror `copied` (what became of the copy: `outrider_mirror_requests_total`)
//!   or `skipped` (not in its share, or an upgrade).
//!
//! Every series of a route, these and its mirror's, is made through its [`RouteSeries`]; when
//! the route has left the policy and the last snapshot and request holding it let go, they
//! leave the exposition.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError, Weak};

use prometheus::core::Collector as _;
use prometheus::{IntCounter, IntCounterVec, Opts, Registry};

/// The route label of requests no route took.
const UNROUTED: &str = ":unrouted";

/// The route-decision and filter-decision families, and the live route handles.
#[derive(Clone)]
pub struct RoutingMetrics {
    decisions: IntCounterVec,
    filters: IntCounterVec,
    /// Requests on the outbound port no route took.
    pub unrouted: IntCounter,
    /// Route handles in use, by route name: a reload reuses those of routes that stayed.
    /// Locked at reloads and when a handle goes, never per request.
    live: Arc<Mutex<HashMap<Arc<str>, Weak<RouteSeries>>>>,
}

/// One route's series: made through it at reloads, removed with its last holder.
pub struct RouteSeries {
    owner: Option<RoutingMetrics>,
    /// The route label.
    pub name: Arc<str>,
    /// Every series made for this route, by family and label values, to remove them.
    made: Mutex<Vec<MadeSeries>>,
}

/// A series made through a [`RouteSeries`]: its family and label values.
type MadeSeries = (IntCounterVec, Box<[Box<str>]>);

/// What the filters of one route did; a counter for each filter the route has.
#[derive(Debug, Clone, Default)]
pub struct FilterCounts {
    /// `request_header_modifier` applied.
    pub request_headers: Option<IntCounter>,
    /// `response_header_modifier` applied (to an upstream's response).
    pub response_headers: Option<IntCounter>,
    /// `url_rewrite` applied, and refused.
    pub rewrite: Option<(IntCounter, IntCounter)>,
    /// `request_redirect` answered, and refused.
    pub redirect: Option<(IntCounter, IntCounter)>,
    /// `request_mirror`: copied, and skipped.
    pub mirror: Option<(IntCounter, IntCounter)>,
}

/// Which filters a route has, for [`RouteSeries::filter_counts`].
#[derive(Debug, Clone, Copy, Default)]
pub struct FilterKinds {
    /// `request_header_modifier`.
    pub request_headers: bool,
    /// `response_header_modifier`.
    pub response_headers: bool,
    /// `url_rewrite`.
    pub rewrite: bool,
    /// `request_redirect`.
    pub redirect: bool,
    /// `request_mirror`.
    pub mirror: bool,
}

impl RoutingMetrics {
    /// Registers the families in `registry` (the proxy's one, by `Metrics::new`).
    pub(crate) fn new(registry: &Registry) -> Result<Self, prometheus::Error> {
        let decisions = IntCounterVec::new(
            Opts::new(
                "outrider_route_decisions_total",
                "Route decisions on the outbound port, by the route and the index of its match \
                 the request met (as `outriderctl get WORKLOAD --routes` prints them); \
                 route=\":unrouted\" when no route took it.",
            ),
            &["route", "match"],
        )?;
        let filters = IntCounterVec::new(
            Opts::new(
                "outrider_route_filter_decisions_total",
                "What route filters did, by route, filter (request_header_modifier, \
                 response_header_modifier, url_rewrite, request_redirect, request_mirror) and \
                 decision (applied, refused; for a mirror copied, skipped).",
            ),
            &["route", "filter", "decision"],
        )?;
        registry.register(Box::new(decisions.clone()))?;
        registry.register(Box::new(filters.clone()))?;
        Ok(Self {
            unrouted: decisions.with_label_values(&[UNROUTED, ""]),
            decisions,
            filters,
            live: Arc::default(),
        })
    }

    /// The handle of route `name`'s series: the live one if a snapshot already uses it, else
    /// a new one.
    pub fn route(&self, name: &str) -> Arc<RouteSeries> {
        let mut live = self.live.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(handle) = live.get(name).and_then(Weak::upgrade) {
            return handle;
        }
        let name: Arc<str> = Arc::from(name);
        let handle = Arc::new(RouteSeries {
            owner: Some(self.clone()),
            name: Arc::clone(&name),
            made: Mutex::default(),
        });
        live.insert(name, Arc::downgrade(&handle));
        handle
    }
}

impl RouteSeries {
    /// The series of `family` with `labels`, removed with this route's.
    pub fn counter(&self, family: &IntCounterVec, labels: &[&str]) -> IntCounter {
        let mut made = self.made.lock().unwrap_or_else(PoisonError::into_inner);
        let same_family = |f: &IntCounterVec| {
            let name = |f: &IntCounterVec| f.desc().first().map(|d| d.fq_name.clone());
            name(f) == name(family)
        };
        // Checked, or every reload would add the route's labels again.
        let known = made
            .iter()
            .any(|(f, l)| l.iter().map(|l| &**l).eq(labels.iter().copied()) && same_family(f));
        if !known {
            made.push((family.clone(), labels.iter().map(|l| (*l).into()).collect()));
        }
        family.with_label_values(labels)
    }

    /// The counter of requests that met this route's match `index`.
    pub fn decision(&self, index: usize) -> Option<IntCounter> {
        let owner = self.owner.as_ref()?;
        Some(self.counter(&owner.decisions, &[&self.name, &index.to_string()]))
    }

    /// The counters of the filters in `kinds`.
    pub fn filter_counts(&self, kinds: FilterKinds) -> FilterCounts {
        let Some(owner) = &self.owner else {
            return FilterCounts::default();
        };
        let one = |filter, decision| self.counter(&owner.filters, &[&self.name, filter, decision]);
        let two = |filter, yes, no| (one(filter, yes), one(filter, no));
        FilterCounts {
            request_headers: kinds
                .request_headers
                .then(|| one("request_header_modifier", "applied")),
            response_headers: kinds
                .response_headers
                .then(|| one("response_header_modifier", "applied")),
            rewrite: kinds
                .rewrite
                .then(|| two("url_rewrite", "applied", "refused")),
            redirect: kinds
                .redirect
                .then(|| two("request_redirect", "applied", "refused")),
            mirror: kinds
                .mirror
                .then(|| two("request_mirror", "copied", "skipped")),
        }
    }
}

impl Drop for RouteSeries {
    fn drop(&mut self) {
        let Some(owner) = self.owner.take() else {
            return;
        };
        let mut live = owner.live.lock().unwrap_or_else(PoisonError::into_inner);
        // A reload that brought the route back after this handle's last holder let go made a
        // new handle on the same series: those stay.
        if live.get(&self.name).is_some_and(|h| h.strong_count() > 0) {
            return;
        }
        live.remove(&self.name);
        drop(live);
        let made = self.made.get_mut().unwrap_or_else(PoisonError::into_inner);
        for (family, labels) in made.drain(..) {
            let labels: Vec<&str> = labels.iter().map(|l| &**l).collect();
            let _ = family.remove_label_values(&labels);
        }
    }
}

/// Adds one to `counter` when there is one.
pub fn count(counter: Option<&IntCounter>) {
    if let Some(counter) = counter {
        counter.inc();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text(registry: &Registry) -> String {
        let mut out = Vec::new();
        let encoder = prometheus::TextEncoder::new();
        prometheus::Encoder::encode(&encoder, &registry.gather(), &mut out).expect("encodes");
        String::from_utf8(out).expect("utf-8")
    }

    #[test]
    fn a_route_series_goes_with_its_last_handle_and_stays_while_one_is_back() {
        let registry = Registry::new();
        let metrics = RoutingMetrics::new(&registry).expect("registers");
        let first = metrics.route("r");
        first.decision(0).expect("counter").inc();
        let mirror = first.filter_counts(FilterKinds {
            mirror: true,
            ..FilterKinds::default()
        });
        mirror.mirror.as_ref().expect("mirror").1.inc();
        // A reload keeping `r` shares the handle; `r` gaining a match adds its series.
        let second = metrics.route("r");
        assert!(Arc::ptr_eq(&first, &second));
        second.decision(1).expect("counter").inc();
        drop(first);
        let shown = text(&registry);
        assert!(
            shown.contains("outrider_route_decisions_total{match=\"0\",route=\"r\"} 1")
                && shown.contains("outrider_route_decisions_total{match=\"1\",route=\"r\"} 1")
                && shown.contains("outrider_route_filter_decisions_total{decision=\"skipped\",filter=\"request_mirror\",route=\"r\"} 1"),
            "{shown}"
        );
        drop(second);
        let shown = text(&registry);
        assert!(!shown.contains("route=\"r\""), "{shown}");
        // The unrouted series is the proxy's, not a route's: it stays.
        metrics.unrouted.inc();
        assert!(text(&registry)
            .contains("outrider_route_decisions_total{match=\"\",route=\":unrouted\"} 1"));
        // A handle made after the old one's last holder let go keeps its series.
        let back = metrics.route("r");
        back.decision(0).expect("counter").inc();
        assert!(
            text(&registry).contains("outrider_route_decisions_total{match=\"0\",route=\"r\"} 1")
        );
    }
}
