//! The `request_mirror` route filter (Gateway API's RequestMirror): a share of a route's
//! requests is copied to another service, fire and forget. The copy runs in its own task,
//! bounded by the filter's timeout and its cap on copies in flight; its response is read to the
//! end and discarded. Nothing in it waits on the primary exchange or is waited on by it: the
//! body copy is taken as the primary upstream reads the body ([`crate::io::tee`]), never ahead.
//! A route without a mirror filter pays one `None` check.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use http::header::{self, HeaderValue};
use http::uri::{Authority, PathAndQuery, Scheme};
use http::{Request, Uri, Version};
use http_body_util::BodyExt as _;
use outrider_config::{Protocol, RequestMirror};
use prometheus::IntCounter;
use tokio::sync::oneshot;

use crate::io::request_body::{Counted, RequestBody};
use crate::io::tee::Teed;
use crate::io::upstream::Upstream;
use crate::telemetry::metrics::MirrorCounters;
use crate::telemetry::routing::count;

/// One compiled `request_mirror` filter of a route.
pub struct Mirror {
    /// The service copies go to.
    upstream: Arc<Upstream>,
    /// The service's name as the copies' `Host` / `:authority`.
    authority: Option<Authority>,
    host: HeaderValue,
    /// Share of requests copied, 0..=100.
    percent: f64,
    body_limit: u64,
    timeout: Duration,
    max_in_flight: usize,
    /// Copies in flight now (shared with their tasks).
    in_flight: Arc<AtomicUsize>,
    counters: MirrorCounters,
    /// Requests copied and skipped (`outrider_route_filter_decisions_total`).
    decisions: Option<(IntCounter, IntCounter)>,
}

/// Why a copy was not sent or got no answer, for its count.
enum Miss {
    Body,
    Failed,
}

impl Mirror {
    /// Compiles `config`, sending to `upstream`, counted in `counters`.
    pub fn new(config: &RequestMirror, upstream: Arc<Upstream>, counters: MirrorCounters) -> Self {
        let name = upstream.spec.name.as_bytes();
        Self {
            authority: Authority::try_from(name).ok(),
            host: HeaderValue::from_bytes(name).unwrap_or(HeaderValue::from_static("mirror")),
            percent: config.percent,
            body_limit: config.body_limit.0,
            timeout: config.timeout.get(),
            max_in_flight: usize::try_from(config.max_in_flight).unwrap_or(usize::MAX),
            in_flight: Arc::default(),
            counters,
            upstream,
            decisions: None,
        }
    }

    /// Counts each request copied (first) and skipped (second) in `decisions`.
    pub fn with_decisions(mut self, decisions: Option<(IntCounter, IntCounter)>) -> Self {
        self.decisions = decisions;
        self
    }

    /// Whether this request is one of the share copied.
    fn chosen(&self) -> bool {
        match self.percent {
            p if p >= 100.0 => true,
            p if p <= 0.0 => false,
            p => fastrand::f64() * 100.0 < p,
        }
    }

    /// Takes a place among the copies in flight, if there is one left.
    fn reserve(&self) -> Option<Slot> {
        let before = self.in_flight.fetch_add(1, Ordering::Relaxed);
        let slot = Slot(Arc::clone(&self.in_flight));
        (before < self.max_in_flight).then_some(slot)
    }

    /// The copy's head: the primary's, as prepared for its upstream (hop-by-hop headers out,
    /// forwarding and trace headers in), with the mirror service's name as its authority.
    fn head(&self, parts: &http::request::Parts) -> Option<Request<()>> {
        let path = parts
            .uri
            .path_and_query()
            .cloned()
            .unwrap_or_else(|| PathAndQuery::from_static("/"));
        let mut req = Request::new(());
        *req.method_mut() = parts.method.clone();
        *req.headers_mut() = parts.headers.clone();
        match self.upstream.spec.protocol {
            Protocol::Http1 => {
                *req.version_mut() = Version::HTTP_11;
                req.headers_mut().insert(header::HOST, self.host.clone());
                *req.uri_mut() = Uri::from(path);
            }
            Protocol::Http2 => {
                *req.version_mut() = Version::HTTP_2;
                req.headers_mut().remove(header::HOST);
                let mut uri = http::uri::Parts::default();
                uri.scheme = Some(Scheme::HTTP);
                uri.authority = Some(self.authority.clone()?);
                uri.path_and_query = Some(path);
                *req.uri_mut() = Uri::from_parts(uri).ok()?;
            }
        }
        Some(req)
    }
}

/// A copy's place among those in flight, given back when its task ends.
struct Slot(Arc<AtomicUsize>);

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Where a copy's body comes from.
enum Source {
    /// The caller's body had ended before routing (or was empty).
    Empty,
    /// The tee's copy, when the caller's body ends.
    Tee(oneshot::Receiver<Teed>),
}

/// Starts the copies of one request to the route's `mirrors` that it is chosen for: `parts` is
/// the head as prepared for the primary upstream, `body` the caller's body, which then keeps a
/// copy for them as it streams.
pub fn dispatch(mirrors: &[Mirror], parts: &http::request::Parts, body: &mut Counted) {
    use http_body::Body as _;
    let declared = body.size_hint().lower();
    let ended = body.is_end_stream();
    for mirror in mirrors {
        if !mirror.chosen() {
            count(mirror.decisions.as_ref().map(|(_, skipped)| skipped));
            continue;
        }
        count(mirror.decisions.as_ref().map(|(copied, _)| copied));
        if declared > mirror.body_limit {
            mirror.counters.skipped_body.inc();
            continue;
        }
        let Some(slot) = mirror.reserve() else {
            mirror.counters.overflow.inc();
            continue;
        };
        let Some(head) = mirror.head(parts) else {
            mirror.counters.failed.inc();
            continue;
        };
        let source = if ended {
            Source::Empty
        } else {
            Source::Tee(body.tee().subscribe(mirror.body_limit))
        };
        let task = Copy {
            upstream: Arc::clone(&mirror.upstream),
            head,
            source,
            body_limit: mirror.body_limit,
        };
        let (counters, timeout) = (mirror.counters.clone(), mirror.timeout);
        tokio::spawn(async move {
            let _slot = slot;
            match tokio::time::timeout(timeout, task.run()).await {
                Ok(Ok(())) => counters.sent.inc(),
                Ok(Err(Miss::Body)) => counters.skipped_body.inc(),
                Ok(Err(Miss::Failed)) => counters.failed.inc(),
                Err(_) => counters.timeout.inc(),
            }
        });
    }
}

/// Counts a request no mirror of the route copies (an upgrade: it has no body to copy).
pub fn skip(mirrors: &[Mirror]) {
    for mirror in mirrors {
        count(mirror.decisions.as_ref().map(|(_, skipped)| skipped));
    }
}

/// One copy on its way.
struct Copy {
    upstream: Arc<Upstream>,
    head: Request<()>,
    source: Source,
    body_limit: u64,
}

impl Copy {
    /// Waits for the body, sends the copy to an endpoint of the mirror service and reads its
    /// response to the end (so its connection goes back to the pool), discarding it.
    async fn run(self) -> Result<(), Miss> {
        let body = match self.source {
            Source::Empty => None,
            Source::Tee(receiver) => match receiver.await {
                Ok(Teed::Body(body)) if body.len() as u64 <= self.body_limit => {
                    (!body.is_empty()).then_some(body)
                }
                Ok(_) | Err(_) => return Err(Miss::Body),
            },
        };
        let affinity = self.upstream.affinity(self.head.headers());
        let endpoint = self
            .upstream
            .pick_for(affinity, None)
            .map_err(|_| Miss::Failed)?;
        let _load = endpoint.start_request();
        let req = self.head.map(|()| RequestBody::Buffered(body));
        let response = endpoint.pool.send(req).await.map_err(|error| {
            tracing::debug!(service = %self.upstream.spec.name, error = %error, "mirror failed");
            Miss::Failed
        })?;
        let mut body = response.into_body();
        // Discarded frame by frame: nothing of it is kept.
        while let Some(frame) = body.frame().await {
            if frame.is_err() {
                break;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_share_copied_follows_percent() {
        let metrics = crate::telemetry::metrics::Metrics::new("test").expect("metrics");
        let spec = crate::io::upstream::UpstreamSpec {
            name: Arc::from("shadow"),
            protocol: Protocol::Http1,
            balancing: outrider_config::LoadBalancing::RoundRobin,
            connect_timeout: Duration::from_secs(1),
            outlier: None,
            max_pending: None,
            tls: None,
        };
        let upstream = Upstream::new(spec, &[], &metrics, None);
        let config = |percent: f64| RequestMirror {
            service: "shadow".into(),
            percent,
            body_limit: outrider_config::ByteSize(10),
            timeout: outrider_config::Duration::from_secs(1),
            max_in_flight: 2,
        };
        let counters = metrics.mirror("shadow", &metrics.routing.route("r"));
        let share = |percent| {
            let mirror = Mirror::new(&config(percent), Arc::clone(&upstream), counters.clone());
            (0..10_000).filter(|_| mirror.chosen()).count()
        };
        assert_eq!(share(100.0), 10_000);
        assert_eq!(share(0.0), 0);
        // 5,000 expected, sd 50.
        assert!(share(50.0).abs_diff(5_000) < 300);
        // The cap: two places, the third is refused until one is given back.
        let mirror = Mirror::new(&config(100.0), upstream, counters);
        let (a, b) = (mirror.reserve(), mirror.reserve());
        assert!(a.is_some() && b.is_some());
        assert!(mirror.reserve().is_none());
        drop(a);
        assert!(mirror.reserve().is_some());
    }
}
