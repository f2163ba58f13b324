//! The proxies as this replica knows them: sessions opening and closing, what each was sent
//! and ACKed, expiry of what is gone, and the statuses and gauges shown for them.

use std::net::SocketAddr;
use std::sync::Arc;

use outrider_config::wire::Ack;

use super::publish::named_workloads;
use super::{Engine, Inner, DEFAULTS};
use crate::api::ProxyStatus;
use crate::metrics::Fleet;
use crate::registry::{AckRefused, Acked, ProxyRecord, Session, SubscribeRefused};

impl Engine {
    /// Opens a session for `proxy` (see [`crate::registry`]): refused while another session
    /// of the same proxy id is live, unless `claimed` is that session's id.
    pub fn connect(
        &self,
        proxy: &str,
        workload: &str,
        peer: Option<SocketAddr>,
        claimed: Option<&str>,
    ) -> Result<Session, SubscribeRefused> {
        let session = self.lock().proxies.connect(proxy, workload, peer, claimed);
        self.proxies_changed.notify_one();
        match &session {
            Ok(_) => tracing::info!(
                proxy,
                workload,
                peer = peer.map(tracing::field::display),
                "proxy subscribed"
            ),
            Err(e) => {
                tracing::warn!(proxy, workload, peer = peer.map(tracing::field::display), error = %e, "subscription refused")
            }
        }
        session
    }

    /// Records that `version` (hashing to `hash`) was written to `proxy`'s stream, or that the
    /// proxy resumed with it.
    pub fn sent(&self, proxy: &str, connection: u64, version: u64, hash: &str) {
        let mut inner = self.lock();
        let committed_at = inner
            .committed
            .iter()
            .rev()
            .find(|(v, _)| *v == version)
            .map(|(_, at)| *at);
        inner
            .proxies
            .sent(proxy, connection, version, hash, committed_at);
        drop(inner);
        self.proxies_changed.notify_one();
    }

    /// Notified whenever a proxy's record may have changed.
    pub fn proxies_changed(&self) -> Arc<tokio::sync::Notify> {
        Arc::clone(&self.proxies_changed)
    }

    /// Records that a stream closed (unless the proxy already opened a newer one).
    pub fn disconnected(&self, proxy: &str, connection: u64) {
        if self.lock().proxies.disconnected(proxy, connection) {
            self.proxies_changed.notify_one();
            tracing::info!(proxy, "proxy stream closed");
        }
    }

    /// Forgets what is gone, so made-up or departed names cannot grow the registry (and the
    /// work of every change) without bound: proxies whose last stream closed at least `after`
    /// ago, and workloads no stream has watched and no document has named for `after` (as
    /// seen by the calls: call it every fraction of `after`). Returns how many of each it
    /// forgot.
    pub fn expire(&self, after: std::time::Duration) -> Forgotten {
        let now = tokio::time::Instant::now();
        let mut inner = self.lock();
        let named = named_workloads(&inner.parsed);
        let Inner {
            published,
            unwatched,
            proxies,
            ..
        } = &mut *inner;
        let expired_proxies = proxies.expire(now, after);
        let mut gone = Vec::new();
        for (workload, sender) in published.iter() {
            if workload == DEFAULTS || named.contains(workload) || sender.receiver_count() > 0 {
                unwatched.remove(workload);
                continue;
            }
            let since = *unwatched.entry(workload.clone()).or_insert(now);
            if now.saturating_duration_since(since) >= after {
                gone.push(workload.clone());
            }
        }
        for workload in &gone {
            published.remove(workload);
            unwatched.remove(workload);
        }
        // Names no longer published (named by a document that went) need no clock.
        unwatched.retain(|w, _| published.contains_key(w));
        drop(inner);
        if expired_proxies > 0 {
            self.proxies_changed.notify_one();
        }
        Forgotten {
            proxies: expired_proxies,
            workloads: gone.len(),
        }
    }

    /// Records a proxy's ACK or NACK, if it comes from the proxy's live session and names a
    /// policy that session was sent.
    pub fn ack(&self, ack: Ack) -> Result<(), AckRefused> {
        let result = self.lock().proxies.ack(ack);
        self.proxies_changed.notify_one();
        match result {
            Ok(Acked::Ack { latency }) => self.metrics.ack(latency),
            Ok(Acked::Nack) => self.metrics.nack(),
            Err(ref e) => tracing::warn!(error = %e, "ACK refused"),
        }
        result.map(drop)
    }

    /// Proxies by workload and state, and each workload's version against what its proxies
    /// applied: the scrape-time gauges of `/metrics`.
    pub fn fleet(&self) -> Fleet {
        let inner = self.lock();
        let mut fleet = Fleet::default();
        for (workload, sender) in &inner.published {
            fleet
                .workloads
                .insert(workload.clone(), (sender.borrow().version, None));
        }
        for (_, p) in inner.proxies.iter() {
            let current = inner
                .published
                .get(&p.workload)
                .map(|s| s.borrow().content_hash.clone());
            let state = proxy_state(p, current.as_deref());
            *fleet
                .proxies
                .entry((p.workload.clone(), state))
                .or_insert(0) += 1;
            if p.connected {
                if let Some((_, oldest)) = fleet.workloads.get_mut(&p.workload) {
                    let applied = p.version_applied.unwrap_or(0);
                    *oldest = Some(oldest.map_or(applied, |o| o.min(applied)));
                }
            }
        }
        fleet
    }

    /// The proxies connected to this replica, and those whose stream closed and that are
    /// not yet forgotten.
    pub fn proxies(&self) -> Vec<ProxyStatus> {
        proxy_statuses(&self.lock())
    }
}

/// What one [`Engine::expire`] forgot.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Forgotten {
    /// Proxies whose last stream closed long enough ago.
    pub proxies: usize,
    /// Workloads that no stream watched and no document named for long enough.
    pub workloads: usize,
}

/// Runs [`Engine::expire`] every quarter of `after` (between 1 s and 30 s), forever: what is
/// gone is forgotten between `after` and `after` plus that period after its last stream
/// closed.
pub async fn expire_gone(engine: Arc<Engine>, after: std::time::Duration) {
    let period = (after / 4).clamp(
        std::time::Duration::from_secs(1),
        std::time::Duration::from_secs(30),
    );
    let mut tick = tokio::time::interval(period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let Forgotten { proxies, workloads } = engine.expire(after);
        if proxies > 0 || workloads > 0 {
            tracing::info!(
                proxies,
                workloads,
                "forgot proxies and workloads gone for {}",
                outrider_config::Duration(after)
            );
        }
    }
}

/// Every proxy's status as this replica knows it.
pub(super) fn proxy_statuses(inner: &Inner) -> Vec<ProxyStatus> {
    let named = named_workloads(&inner.parsed);
    inner
        .proxies
        .iter()
        .map(|(id, p)| {
            let current = inner
                .published
                .get(&p.workload)
                .map(|s| s.borrow().content_hash.clone());
            let state = proxy_state(p, current.as_deref());
            ProxyStatus {
                proxy: id.clone(),
                workload: p.workload.clone(),
                connected: p.connected,
                connected_since_ms: p.connected_since_ms,
                version_sent: p.version_sent,
                version_applied: p.version_applied,
                applied_at_ms: p.applied_at_ms,
                last_nack: p.last_nack.clone(),
                state: state.to_string(),
                pending_since_ms: matches!(state, "pending" | "nack")
                    .then_some(p.last_sent_at_ms)
                    .flatten(),
                workload_named: named.contains(&p.workload),
                disconnected_at_ms: p.disconnected_at_ms,
                replica: None,
            }
        })
        .collect()
}

/// A proxy's state as `status` and `/metrics` show it, given its workload's policy hash in
/// force.
fn proxy_state(p: &ProxyRecord, current: Option<&str>) -> &'static str {
    let nack_pending = p
        .last_nack
        .as_ref()
        .is_some_and(|n| Some(n.version) > p.version_applied);
    if !p.connected {
        "disconnected"
    } else if p.hash_applied.is_some() && p.hash_applied.as_deref() == current {
        "in-sync"
    } else if nack_pending {
        "nack"
    } else {
        "pending"
    }
}
