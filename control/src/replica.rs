//! What one replica of several (on etcd) does on its own behalf: its lease, and the election of
//! the replica that imports the policy directory.
//!
//! Each replica holds one etcd lease of `--lease-ttl`, kept alive at a third of it
//! ([`run_session`]). Under that lease it campaigns in etcd's election: the one elected leads,
//! and only the leader imports the watched policy directory (a ConfigMap every replica
//! mounts), so an edit becomes one version, not one per replica. The import is idempotent
//! against the store (the store holds each imported file's content hash, and the leader
//! reads the store before importing), and fenced by the leader's election key
//! ([`crate::etcd::EtcdStore::save_fenced`]), so an edit saved while leadership moves is
//! imported exactly once. A leader whose keep-alives go unconfirmed stops leading when its
//! lease may have expired ([`LeaseClock`]), before etcd lets another replica take over.
//!
//! With a state directory there is one replica: it always leads.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio::time::Instant;

use crate::api::ReplicaStatus;
use crate::etcd::{EtcdStore, LEADER};

/// Shortest and longest `--lease-ttl`: etcd refuses leases shorter than about 1.5 election
/// timeouts (1.5 s with its defaults); a longer one only delays the handover after a crash.
pub const LEASE_TTL_RANGE: std::ops::RangeInclusive<Duration> =
    Duration::from_secs(2)..=Duration::from_secs(60);
/// Keep-alives sent and not yet answered beyond which no more are sent (the lease is about
/// to be declared lost anyway).
const MAX_OUTSTANDING: usize = 8;

/// This replica: its name and whether it leads.
pub struct Replica {
    /// Unique among the replicas: the election's value.
    pub name: String,
    leader: watch::Sender<bool>,
    /// The lease this replica holds; `None` while there is none.
    lease: watch::Sender<Option<i64>>,
    etcd: Option<EtcdStore>,
}

impl Replica {
    /// The only replica, on a state directory: it always leads.
    pub fn single(name: String) -> Self {
        Self {
            name,
            leader: watch::Sender::new(true),
            lease: watch::Sender::new(None),
            etcd: None,
        }
    }

    /// One of several on `etcd`: it leads once elected ([`run_session`]).
    pub fn on_etcd(name: String, etcd: EtcdStore) -> Self {
        Self {
            name,
            leader: watch::Sender::new(false),
            lease: watch::Sender::new(None),
            etcd: Some(etcd),
        }
    }

    /// Whether this replica leads now.
    pub fn is_leader(&self) -> bool {
        *self.leader.borrow()
    }

    /// Follows whether this replica leads.
    pub fn leadership(&self) -> watch::Receiver<bool> {
        self.leader.subscribe()
    }

    /// On shutdown: stops leading and revokes the lease, so leadership moves and this
    /// replica's keys go at once rather than after the TTL.
    pub async fn step_down(&self) {
        let lease = *self.lease.borrow();
        let (Some(etcd), Some(lease)) = (&self.etcd, lease) else {
            return;
        };
        etcd.set_fence(None);
        self.leader.send_replace(false);
        let mut leases = etcd.watcher.lease_client();
        match tokio::time::timeout(etcd.timeout(), leases.revoke(lease)).await {
            Ok(Ok(_)) => tracing::info!(replica = %self.name, "stepped down: lease revoked"),
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "cannot revoke the lease; it expires after its TTL")
            }
            Err(_) => tracing::warn!("no answer revoking the lease; it expires after its TTL"),
        }
    }

    /// For `status`.
    pub fn status(&self) -> ReplicaStatus {
        ReplicaStatus {
            name: self.name.clone(),
            leader: self.is_leader(),
            replicated: self.etcd.is_some(),
        }
    }

    /// For `/ready`'s body (replicas on etcd only: a single replica's is unchanged).
    pub fn ready_details(&self) -> Option<String> {
        self.etcd.as_ref()?;
        Some(format!(
            " replica={:?} leader={}",
            self.name,
            self.is_leader()
        ))
    }
}

/// When a lease may have expired, as far as this replica can know: the TTL from the send of
/// the last keep-alive etcd confirmed (etcd counts it from the keep-alive's arrival, later).
/// Past it, the replica must act as if its lease were gone: another may lead.
#[derive(Debug, Clone, Copy)]
pub struct LeaseClock {
    ttl: Duration,
    valid_until: Instant,
}

impl LeaseClock {
    /// A lease of `ttl` asked for at `asked`.
    pub fn new(asked: Instant, ttl: Duration) -> Self {
        Self {
            ttl,
            valid_until: asked.checked_add(ttl).unwrap_or(asked),
        }
    }

    /// etcd confirmed the keep-alive sent at `sent`, granting `ttl` more.
    pub fn confirmed(&mut self, sent: Instant, ttl: Duration) {
        if let Some(until) = sent.checked_add(ttl) {
            self.valid_until = self.valid_until.max(until);
        }
    }

    /// Until when the lease is surely held.
    pub fn valid_until(&self) -> Instant {
        self.valid_until
    }

    /// How often to send a keep-alive: three chances per TTL.
    pub fn renew_every(&self) -> Duration {
        (self.ttl / 3).max(Duration::from_millis(100))
    }
}

/// Holds this replica's lease and campaigns with it, forever: grants a lease, keeps it alive,
/// campaigns; when the lease may have expired, stops leading at once, then starts over.
pub async fn run_session(etcd: EtcdStore, replica: Arc<Replica>, ttl: Duration) {
    let mut backoff = Duration::from_millis(100);
    loop {
        let asked = Instant::now();
        let mut leases = etcd.watcher.lease_client();
        let secs = i64::try_from(ttl.as_secs()).unwrap_or(i64::MAX);
        let lease = match tokio::time::timeout(etcd.timeout(), leases.grant(secs, None)).await {
            Ok(Ok(granted)) => granted.id(),
            Ok(Err(e)) => {
                tracing::info!(error = %e, "no etcd lease yet; trying again");
                tokio::time::sleep(backoff).await;
                backoff = backoff.saturating_mul(2).min(Duration::from_secs(2));
                continue;
            }
            Err(_) => {
                tracing::info!("no etcd lease yet (no answer); trying again");
                tokio::time::sleep(backoff).await;
                backoff = backoff.saturating_mul(2).min(Duration::from_secs(2));
                continue;
            }
        };
        backoff = Duration::from_millis(100);
        replica.lease.send_replace(Some(lease));
        let clock = LeaseClock::new(asked, ttl);
        let why = tokio::select! {
            why = hold_lease(&etcd, lease, clock) => why,
            never = campaign(&etcd, &replica, lease) => match never {},
        };
        // At once: another replica may lead from now on.
        etcd.set_fence(None);
        replica.lease.send_replace(None);
        if replica.leader.send_replace(false) {
            tracing::warn!(replica = %replica.name, reason = %why, "leadership lost: this replica stops importing the policy directory");
        } else {
            tracing::info!(replica = %replica.name, reason = %why, "etcd lease lost; taking a new one");
        }
        // Best effort: a lease etcd still holds keeps this replica's keys until it expires.
        let mut leases = etcd.watcher.lease_client();
        let _ = tokio::time::timeout(etcd.timeout(), leases.revoke(lease)).await;
    }
}

/// Campaigns until elected, then leads until the lease is lost (the caller's select ends it).
async fn campaign(etcd: &EtcdStore, replica: &Replica, lease: i64) -> std::convert::Infallible {
    loop {
        let mut election = etcd.elector.election_client();
        match election
            .campaign(etcd.key(LEADER), replica.name.as_bytes(), lease)
            .await
        {
            Ok(won) => {
                if let Some(key) = won.leader() {
                    etcd.set_fence(Some(key.key().to_vec()));
                    replica.leader.send_replace(true);
                    tracing::info!(replica = %replica.name, "leadership gained: this replica imports the policy directory");
                    return std::future::pending().await;
                }
            }
            Err(e) => tracing::debug!(error = %e, "campaign failed; campaigning again"),
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Keeps `lease` alive, reopening the keep-alive stream through another member when one goes
/// away; returns why the lease counts as lost once [`LeaseClock::valid_until`] passed without
/// a confirmation, or etcd says the lease is gone.
async fn hold_lease(etcd: &EtcdStore, lease: i64, mut clock: LeaseClock) -> String {
    let lost = |clock: &LeaseClock| {
        format!(
            "no keep-alive confirmed within the lease's TTL ({:?})",
            clock.ttl
        )
    };
    loop {
        let mut leases = etcd.watcher.lease_client();
        let sent = Instant::now();
        let (mut keeper, mut stream) = match tokio::time::timeout_at(
            clock.valid_until(),
            leases.keep_alive(lease),
        )
        .await
        {
            Err(_) => return lost(&clock),
            Ok(Ok(pair)) => pair,
            Ok(Err(etcd_client::Error::LeaseKeepAliveError(e))) => {
                return format!("etcd no longer holds the lease: {e}")
            }
            Ok(Err(e)) => {
                tracing::debug!(error = %e, "cannot keep the lease alive here; trying another member");
                let retry = Instant::now() + Duration::from_millis(100);
                if retry >= clock.valid_until() {
                    return lost(&clock);
                }
                tokio::time::sleep_until(retry).await;
                continue;
            }
        };
        clock.confirmed(sent, clock.ttl);
        let mut outstanding: VecDeque<Instant> = VecDeque::new();
        let mut tick =
            tokio::time::interval_at(Instant::now() + clock.renew_every(), clock.renew_every());
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let broke = loop {
            tokio::select! {
                () = tokio::time::sleep_until(clock.valid_until()) => return lost(&clock),
                _ = tick.tick() => {
                    if outstanding.len() >= MAX_OUTSTANDING {
                        continue;
                    }
                    let sent = Instant::now();
                    match tokio::time::timeout(clock.renew_every(), keeper.keep_alive()).await {
                        Ok(Ok(())) => outstanding.push_back(sent),
                        Ok(Err(e)) => break e.to_string(),
                        Err(_) => break "keep-alive not sent in time".to_string(),
                    }
                }
                message = stream.message() => match message {
                    Ok(Some(answer)) if answer.ttl() > 0 => {
                        if let Some(sent) = outstanding.pop_front() {
                            let granted = Duration::from_secs(u64::try_from(answer.ttl()).unwrap_or(0));
                            clock.confirmed(sent, granted);
                        }
                    }
                    Ok(Some(_)) => return "etcd says the lease expired".to_string(),
                    Ok(None) => break "the keep-alive stream ended".to_string(),
                    Err(e) => break e.to_string(),
                },
            }
        };
        tracing::debug!(error = %broke, "keep-alive stream broke; reopening it");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn an_unconfirmed_lease_counts_as_lost_a_ttl_after_the_last_confirmed_send() {
        let ttl = Duration::from_secs(3);
        let start = Instant::now();
        let mut clock = LeaseClock::new(start, ttl);
        assert_eq!(clock.valid_until(), start + ttl);
        assert_eq!(clock.renew_every(), Duration::from_secs(1));
        // A keep-alive sent at 1 s and answered at 1.5 s: valid until 4 s, not 4.5 s.
        tokio::time::advance(Duration::from_millis(1500)).await;
        clock.confirmed(start + Duration::from_secs(1), ttl);
        assert_eq!(clock.valid_until(), start + Duration::from_secs(4));
        // A late answer to an older send never shortens it.
        clock.confirmed(start, ttl);
        assert_eq!(clock.valid_until(), start + Duration::from_secs(4));
        // Nothing confirmed since: leading stops at 4 s.
        tokio::time::sleep_until(clock.valid_until()).await;
        assert_eq!(start.elapsed(), Duration::from_secs(4));
    }
}
