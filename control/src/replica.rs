//! What one replica of several (on etcd) does on its own behalf: its lease, the election of the
//! replica that imports the policy directory, its proxies' status in etcd, and how current its
//! view is.
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
//! Under the same lease each replica writes its proxies' status ([`publish_proxies`]), so a
//! status read on any replica lists every proxy, and a dead replica's proxies leave it when its
//! lease expires. With a state directory there is one replica: it always leads.

use std::collections::{BTreeMap, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use etcd_client::{DeleteOptions, GetOptions, PutOptions, Txn, TxnOp};
use tokio::sync::{watch, Notify};
use tokio::time::Instant;

use crate::api::{ProxyStatus, ReplicaStatus};
use crate::engine::Engine;
use crate::etcd::{EtcdStore, LEADER, PROXIES};

/// Shortest and longest `--lease-ttl`: etcd lengthens a lease shorter than 1.5 election
/// timeouts (1.5 s with its defaults) to that; a longer one only delays the handover after a
/// crash.
pub const LEASE_TTL_RANGE: std::ops::RangeInclusive<Duration> =
    Duration::from_secs(2)..=Duration::from_secs(60);
/// Shortest pause between two writes of a replica's proxies' status: a fleet reconnecting
/// at once becomes a few batches, not one write per proxy.
pub const PROXY_WRITE_INTERVAL: Duration = Duration::from_millis(250);
/// Most writes in one etcd transaction (etcd's default limit is 128 operations).
const MAX_TXN_OPS: usize = 64;
/// Keep-alives sent and not yet answered beyond which no more are sent (the lease is about
/// to be declared lost anyway).
const MAX_OUTSTANDING: usize = 8;

/// This replica: its name, whether it leads, and how current its view of the store is.
pub struct Replica {
    /// Unique among the replicas: the election's value and the key of its proxies' status.
    pub name: String,
    leader: watch::Sender<bool>,
    /// The lease the proxies' status is written under; `None` while there is none.
    lease: watch::Sender<Option<i64>>,
    /// A view behind the store for longer than this is called stale.
    stale_after: Duration,
    etcd: Option<EtcdStore>,
    /// Set by [`Self::step_down`]: no new lease, no new campaign.
    stopping: AtomicBool,
}

impl Replica {
    /// The only replica, on a state directory: it always leads.
    pub fn single(name: String) -> Self {
        Self {
            name,
            leader: watch::Sender::new(true),
            lease: watch::Sender::new(None),
            stale_after: Duration::MAX,
            etcd: None,
            stopping: AtomicBool::new(false),
        }
    }

    /// One of several on `etcd`: it leads once elected ([`run_session`]).
    pub fn on_etcd(name: String, etcd: EtcdStore, stale_after: Duration) -> Self {
        Self {
            name,
            leader: watch::Sender::new(false),
            lease: watch::Sender::new(None),
            stale_after,
            etcd: Some(etcd),
            stopping: AtomicBool::new(false),
        }
    }

    /// The etcd store of a replica of several; `None` for the single one.
    pub(crate) fn etcd(&self) -> Option<&EtcdStore> {
        self.etcd.as_ref()
    }

    /// Whether this replica leads now.
    pub fn is_leader(&self) -> bool {
        *self.leader.borrow()
    }

    /// Follows whether this replica leads.
    pub fn leadership(&self) -> watch::Receiver<bool> {
        self.leader.subscribe()
    }

    /// The lease this replica's keys are written under, as it changes.
    pub(crate) fn leases(&self) -> watch::Receiver<Option<i64>> {
        self.lease.subscribe()
    }

    /// On shutdown: stops leading and revokes the lease, so leadership moves and this
    /// replica's proxies leave `status` at once rather than after the TTL.
    pub async fn step_down(&self) {
        self.stopping.store(true, Ordering::Relaxed);
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
        let behind_since = self.etcd.as_ref().and_then(EtcdStore::behind_since);
        let (behind, stale) = staleness(behind_since, Instant::now(), self.stale_after);
        ReplicaStatus {
            name: self.name.clone(),
            leader: self.is_leader(),
            replicated: self.etcd.is_some(),
            view_behind_ms: behind.map(|b| u64::try_from(b.as_millis()).unwrap_or(u64::MAX)),
            view_stale: stale,
            other_replicas_error: None,
        }
    }

    /// For `/ready`'s body (replicas on etcd only: a single replica's is unchanged).
    pub fn ready_details(&self) -> Option<String> {
        self.etcd.as_ref()?;
        let status = self.status();
        let mut details = format!(" replica={:?} leader={}", self.name, status.leader);
        if status.view_stale {
            let behind = status.view_behind_ms.unwrap_or_default() / 1000;
            details.push_str(&format!(" view=stale view_behind={behind}s"));
        }
        Some(details)
    }

    /// Every replica's proxies (from etcd) with this one's own (from `local`, more current):
    /// a proxy that moved is shown once, where it is connected (or connected last).
    pub async fn all_proxies(
        &self,
        local: Vec<ProxyStatus>,
        status: &mut ReplicaStatus,
    ) -> Vec<ProxyStatus> {
        let mut local: Vec<ProxyStatus> = local
            .into_iter()
            .map(|mut p| {
                p.replica = Some(self.name.clone());
                p
            })
            .collect();
        let Some(etcd) = &self.etcd else {
            return local;
        };
        match read_proxies(etcd).await {
            Ok(others) => {
                local.extend(
                    others
                        .into_iter()
                        .filter(|p| p.replica.as_deref() != Some(&self.name)),
                );
                merge_proxies(local)
            }
            Err(e) => {
                status.other_replicas_error = Some(e);
                local
            }
        }
    }
}

/// How long a view behind the store since `behind_since` has been so at `now`, and whether
/// that is longer than `stale_after`.
fn staleness(
    behind_since: Option<Instant>,
    now: Instant,
    stale_after: Duration,
) -> (Option<Duration>, bool) {
    let behind = behind_since.map(|since| now.saturating_duration_since(since));
    (behind, behind.is_some_and(|b| b > stale_after))
}

/// One entry per proxy id: the connected one, else the one connected last.
fn merge_proxies(all: Vec<ProxyStatus>) -> Vec<ProxyStatus> {
    let mut by_id: BTreeMap<String, ProxyStatus> = BTreeMap::new();
    for proxy in all {
        let rank = |p: &ProxyStatus| (p.connected, p.connected_since_ms);
        match by_id.get(&proxy.proxy) {
            Some(kept) if rank(kept) >= rank(&proxy) => {}
            _ => {
                by_id.insert(proxy.proxy.clone(), proxy);
            }
        }
    }
    by_id.into_values().collect()
}

async fn read_proxies(etcd: &EtcdStore) -> Result<Vec<ProxyStatus>, String> {
    if !etcd.available() {
        // Known down: answer at once rather than after the timeout.
        return Err("other replicas' proxies unreadable: etcd is unavailable".into());
    }
    let mut kv = etcd.watcher.kv_client();
    let prefix = etcd.key(PROXIES);
    let read = tokio::time::timeout(
        etcd.timeout(),
        kv.get(prefix, Some(GetOptions::new().with_prefix())),
    );
    let response = match read.await {
        Ok(Ok(response)) => response,
        Ok(Err(e)) => return Err(format!("other replicas' proxies unreadable: {e}")),
        Err(_) => {
            return Err(format!(
                "other replicas' proxies unreadable: no answer within {:?}",
                etcd.timeout()
            ))
        }
    };
    Ok(response
        .kvs()
        .iter()
        .filter_map(|kv| serde_json::from_slice(kv.value()).ok())
        .collect())
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
        if replica.stopping.load(Ordering::Relaxed) {
            // Shutting down: the revoked lease is not replaced.
            return;
        }
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
                if replica.stopping.load(Ordering::Relaxed) {
                    return std::future::pending().await;
                }
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

/// Writes this replica's proxies' status under its lease whenever it changes, at most once per
/// [`PROXY_WRITE_INTERVAL`], forever; everything again under each new lease. Proxies forgotten
/// by the registry's expiry (`--registry-expiry`) are deleted, so the list in etcd follows
/// the replica's own `status --all`; a dead replica's entries go with its lease.
pub async fn publish_proxies(etcd: EtcdStore, engine: Arc<Engine>, replica: Arc<Replica>) {
    let changed = engine.proxies_changed();
    let mut leases = replica.lease.subscribe();
    let mut written = Written::default();
    loop {
        let lease = *leases.borrow_and_update();
        if write_proxies(&etcd, &engine, &replica, lease, &mut written).await {
            if !next_write(&changed, &mut leases, PROXY_WRITE_INTERVAL).await {
                return;
            }
        } else {
            // etcd refused or did not answer: everything again, a little later.
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    }
}

/// What is in etcd: each proxy's status as written, and under which lease.
#[derive(Default)]
struct Written {
    lease: Option<i64>,
    values: BTreeMap<String, Vec<u8>>,
}

/// Writes what changed since `written`; false when etcd did not take it.
async fn write_proxies(
    etcd: &EtcdStore,
    engine: &Engine,
    replica: &Replica,
    lease: Option<i64>,
    written: &mut Written,
) -> bool {
    let Some(lease) = lease else {
        // Without a lease nothing can be written; all of it goes under the next one.
        *written = Written::default();
        return true;
    };
    if written.lease != Some(lease) {
        *written = Written::default();
    }
    let now: BTreeMap<String, Vec<u8>> = engine
        .proxies()
        .into_iter()
        .map(|mut p| {
            p.replica = Some(replica.name.clone());
            let value = serde_json::to_vec(&p).unwrap_or_default();
            (p.proxy, value)
        })
        .collect();
    let (puts, deletes) = diff(&written.values, &now);
    let base = format!("{}{}/", etcd.key(PROXIES), replica.name);
    let mut ops: Vec<TxnOp> = puts
        .iter()
        .map(|id| {
            let value = now.get(id).cloned().unwrap_or_default();
            TxnOp::put(
                format!("{base}{id}"),
                value,
                Some(PutOptions::new().with_lease(lease)),
            )
        })
        .collect();
    ops.extend(
        deletes
            .iter()
            .map(|id| TxnOp::delete(format!("{base}{id}"), None::<DeleteOptions>)),
    );
    let mut kv = etcd.client.kv_client();
    for batch in ops.chunks(MAX_TXN_OPS) {
        let txn = Txn::new().and_then(batch.to_vec());
        let failed = match tokio::time::timeout(etcd.timeout(), kv.txn(txn)).await {
            Ok(Ok(_)) => continue,
            Ok(Err(e)) => e.to_string(),
            Err(_) => format!("no answer within {:?}", etcd.timeout()),
        };
        tracing::debug!(error = %failed, "cannot write the proxies' status; writing it all again");
        *written = Written::default();
        return false;
    }
    *written = Written {
        lease: Some(lease),
        values: now,
    };
    true
}

/// Waits `interval` (the rate bound), then for a change of the proxies (one noticed during
/// the wait counts: [`Notify`] keeps it) or of the lease. False when the lease's sender is
/// gone.
pub async fn next_write(
    changed: &Notify,
    leases: &mut watch::Receiver<Option<i64>>,
    interval: Duration,
) -> bool {
    tokio::time::sleep(interval).await;
    tokio::select! {
        () = changed.notified() => true,
        lease = leases.changed() => lease.is_ok(),
    }
}

/// Which entries to put (new or changed) and which to delete (gone), `written` against `now`.
fn diff(
    written: &BTreeMap<String, Vec<u8>>,
    now: &BTreeMap<String, Vec<u8>>,
) -> (Vec<String>, Vec<String>) {
    let puts = now
        .iter()
        .filter(|(id, value)| written.get(*id) != Some(value))
        .map(|(id, _)| id.clone())
        .collect();
    let deletes = written
        .keys()
        .filter(|id| !now.contains_key(*id))
        .cloned()
        .collect();
    (puts, deletes)
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

    #[tokio::test(start_paused = true)]
    async fn proxy_writes_are_coalesced_and_rate_bounded() {
        let changed = Arc::new(Notify::new());
        let (lease_tx, mut leases) = watch::channel(Some(1));
        let start = Instant::now();
        let notifier = {
            let changed = Arc::clone(&changed);
            tokio::spawn(async move {
                // A burst of changes at 10..100 ms, one more at 2 s, then the end.
                for _ in 0..10 {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    changed.notify_one();
                }
                tokio::time::sleep_until(start + Duration::from_secs(2)).await;
                changed.notify_one();
                tokio::time::sleep(Duration::from_secs(1)).await;
                drop(lease_tx);
            })
        };
        let mut writes = vec![start.elapsed()];
        while next_write(&changed, &mut leases, PROXY_WRITE_INTERVAL).await {
            writes.push(start.elapsed());
        }
        notifier.await.expect("notifier");
        // At once; the burst as one write after the interval; the late change at once.
        assert_eq!(
            writes,
            [Duration::ZERO, PROXY_WRITE_INTERVAL, Duration::from_secs(2)]
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_view_is_stale_once_behind_for_longer_than_the_limit() {
        let limit = Duration::from_secs(10);
        assert_eq!(staleness(None, Instant::now(), limit), (None, false));
        let broke = Instant::now();
        tokio::time::advance(limit).await;
        assert_eq!(
            staleness(Some(broke), Instant::now(), limit),
            (Some(limit), false)
        );
        tokio::time::advance(Duration::from_millis(1)).await;
        let (behind, stale) = staleness(Some(broke), Instant::now(), limit);
        assert_eq!(behind, Some(limit + Duration::from_millis(1)));
        assert!(stale);
    }

    #[test]
    fn diff_puts_changed_and_deletes_gone() {
        let map = |pairs: &[(&str, &str)]| -> BTreeMap<String, Vec<u8>> {
            pairs
                .iter()
                .map(|(k, v)| ((*k).to_string(), v.as_bytes().to_vec()))
                .collect()
        };
        let (puts, deletes) = diff(
            &map(&[("a", "1"), ("b", "1"), ("c", "1")]),
            &map(&[("a", "1"), ("b", "2"), ("d", "1")]),
        );
        assert_eq!(puts, ["b", "d"]);
        assert_eq!(deletes, ["c"]);
    }

    fn proxy(id: &str, replica: &str, connected: bool, since: u64) -> ProxyStatus {
        ProxyStatus {
            proxy: id.into(),
            workload: "w".into(),
            connected,
            connected_since_ms: since,
            version_sent: None,
            version_applied: None,
            applied_at_ms: None,
            last_nack: None,
            state: if connected { "pending" } else { "disconnected" }.into(),
            pending_since_ms: None,
            workload_named: true,
            disconnected_at_ms: None,
            replica: Some(replica.into()),
        }
    }

    #[test]
    fn a_proxy_that_moved_shows_once_where_it_is_connected() {
        let merged = merge_proxies(vec![
            proxy("p", "one", false, 5),
            proxy("p", "two", true, 3),
            proxy("q", "one", false, 1),
            proxy("q", "two", false, 2),
        ]);
        let shown: Vec<(&str, &str)> = merged
            .iter()
            .map(|p| (p.proxy.as_str(), p.replica.as_deref().unwrap_or("")))
            .collect();
        assert_eq!(shown, [("p", "two"), ("q", "two")]);
    }
}
