//! The service registry behind `discovery: registry`: the addresses proxies registered
//! (`outrider-proxy --register SERVICE`) for the services their workloads serve, each kept
//! for the registration TTL (`--registration-ttl`) and renewed by the proxy's next
//! registration, so a proxy that dies leaves within the TTL and one that drains leaves at once
//! ([`ServiceRegistry::deregister`]).
//!
//! The registry keeps one [`View`] (each service's sorted addresses and its pre-encoded
//! [`ServerMessage::Endpoints`] line) in a [`watch`] channel: a registration that changes a
//! service's addresses costs one encode of that service, whatever the number of subscribers,
//! and a renewal that changes nothing costs no push at all. Subscription streams send a
//! service's line when its entry in the view is a new one (compared by pointer).
//!
//! With one replica (a state directory) registrations live in memory only: a restarted
//! control plane has them back within a third of the TTL, as proxies renew. Until one TTL
//! after its start ([`ServiceRegistry::warm_at`]) it pushes no endpoints at all, so its
//! not-yet-renewed registry does not empty callers' pools: they keep the endpoints they had. On etcd, each
//! replica also writes the registrations it holds under `registry/<replica>/<proxy>` with its
//! own lease ([`publish_registrations`]) and watches every replica's ([`watch_registrations`]):
//! a service's endpoints are those registered with any replica, a proxy that dies leaves when
//! the replica it renewed with expires it, and the registrations of a replica that dies leave
//! with its lease (`--lease-ttl`), by which time their proxies have renewed with another.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use bytes::Bytes;
use outrider_config::wire::{
    EndpointsUpdate, Registration, ServerMessage, MAX_REGISTERED_SERVICES,
};
use tokio::sync::{watch, Notify};
use tokio::time::Instant;

use crate::etcd::{EtcdStore, REGISTRY};
use crate::replica::Replica;

/// Shortest and longest `--registration-ttl`.
pub const TTL_RANGE: std::ops::RangeInclusive<Duration> =
    Duration::from_secs(1)..=Duration::from_secs(300);
/// Default `--registration-ttl`.
pub const DEFAULT_TTL: Duration = Duration::from_secs(10);
/// Most registrations held at once; more are refused until some expire.
pub const MAX_REGISTRATIONS: usize = 50_000;
/// Expired registrations are swept this many times per TTL: one leaves at most a tenth of the
/// TTL after it expired.
const SWEEPS_PER_TTL: u32 = 10;

/// One service's registered addresses as pushed.
#[derive(Debug, PartialEq, Eq)]
pub struct ServiceEndpoints {
    /// The addresses, sorted and without repeats.
    pub addresses: Vec<SocketAddr>,
    /// The [`ServerMessage::Endpoints`] line (JSON and `\n`).
    pub line: Bytes,
}

impl ServiceEndpoints {
    /// The entry of `service` with `addresses` (sorted, deduplicated), its line encoded.
    pub fn new(service: &str, addresses: Vec<SocketAddr>) -> Self {
        let message = ServerMessage::Endpoints(EndpointsUpdate {
            service: service.to_string(),
            addresses: addresses.clone(),
        });
        let mut line = serde_json::to_vec(&message).unwrap_or_default();
        line.push(b'\n');
        Self {
            addresses,
            line: Bytes::from(line),
        }
    }
}

/// Every service with at least one registered address. A service not in it has none.
pub type View = BTreeMap<String, Arc<ServiceEndpoints>>;

/// Why a registration was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RegistrationError {
    /// The proxy id is empty or too long.
    #[error("`proxy` must be 1 to 253 bytes")]
    Proxy,
    /// No service, too many, or a name that cannot be a service's.
    #[error(
        "`services`: 1 to {MAX_REGISTERED_SERVICES} service names (letters, digits, '-', '.', '_')"
    )]
    Services,
    /// An address callers cannot reach: port 0 or a wildcard IP.
    #[error("`address` {0} cannot be reached by callers (port 0 or a wildcard IP)")]
    Address(SocketAddr),
    /// The registry holds [`MAX_REGISTRATIONS`] already.
    #[error("the registry is full ({MAX_REGISTRATIONS} registrations)")]
    Full,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Entry {
    services: Vec<String>,
    address: SocketAddr,
    expires: Instant,
}

/// A registration as written in etcd.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
struct Stored {
    services: Vec<String>,
    address: SocketAddr,
}

/// The registrations held here, by proxy id, and those the other replicas hold (on etcd).
#[derive(Default)]
struct Entries {
    local: HashMap<String, Entry>,
    /// By (replica, proxy) of their etcd key (`registry/<replica>/<proxy>`), the other
    /// replicas' only.
    remote: BTreeMap<(String, String), Stored>,
}

/// The registrations of the proxies, by proxy id, and the view pushed from them.
pub struct ServiceRegistry {
    ttl: Duration,
    /// One TTL after the start: by then every live proxy has renewed here.
    warm_at: Instant,
    entries: Mutex<Entries>,
    view: watch::Sender<Arc<View>>,
    /// Told when the local registrations change (for the etcd writer).
    local_changed: Notify,
    /// What happened to registrations here, for `/metrics`.
    counts: Counts,
}

/// Registrations taken (new or changed; renewals not counted), removed by the proxy, and
/// expired, by this replica since its start.
#[derive(Debug, Default)]
struct Counts {
    registered: AtomicU64,
    deregistered: AtomicU64,
    expired: AtomicU64,
}

/// What `/metrics` shows of the registry ([`ServiceRegistry::counts`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RegistryCounts {
    /// Registrations taken by this replica: new, or changed (another address or services);
    /// renewals are not counted.
    pub registered: u64,
    /// Registrations removed by their proxy (it drains), through this replica.
    pub deregistered: u64,
    /// Registrations held here that expired (their proxy stopped renewing them).
    pub expired: u64,
}

impl ServiceRegistry {
    /// An empty registry whose registrations live `ttl` unless renewed.
    pub fn new(ttl: Duration) -> Self {
        Self {
            ttl,
            warm_at: Instant::now().checked_add(ttl).unwrap_or_else(Instant::now),
            entries: Mutex::new(Entries::default()),
            view: watch::Sender::new(Arc::new(View::new())),
            local_changed: Notify::new(),
            counts: Counts::default(),
        }
    }

    /// Registrations taken, removed and expired here since the start.
    pub fn counts(&self) -> RegistryCounts {
        RegistryCounts {
            registered: self.counts.registered.load(Ordering::Relaxed),
            deregistered: self.counts.deregistered.load(Ordering::Relaxed),
            expired: self.counts.expired.load(Ordering::Relaxed),
        }
    }

    /// The registration TTL.
    pub fn ttl(&self) -> Duration {
        self.ttl
    }

    /// From when endpoints are pushed: one TTL after the start, when every live proxy has
    /// renewed its registration (a third of the TTL) here. Before, the registry may be missing
    /// registrations a previous instance held, and a push would empty callers' pools.
    pub fn warm_at(&self) -> Instant {
        self.warm_at
    }

    /// The view, for a subscription stream.
    pub fn subscribe(&self) -> watch::Receiver<Arc<View>> {
        self.view.subscribe()
    }

    /// The view now.
    pub fn view(&self) -> Arc<View> {
        Arc::clone(&self.view.borrow())
    }

    fn lock(&self) -> MutexGuard<'_, Entries> {
        // The map is whole after every statement that changes it: a panic elsewhere while
        // holding the lock leaves nothing half-done.
        self.entries.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Registers (or renews) `registration` until `ttl` from now.
    pub fn register(&self, registration: Registration) -> Result<(), RegistrationError> {
        let Registration {
            proxy,
            mut services,
            address,
        } = registration;
        if proxy.is_empty() || proxy.len() > 253 {
            return Err(RegistrationError::Proxy);
        }
        services.sort();
        services.dedup();
        if services.is_empty()
            || services.len() > MAX_REGISTERED_SERVICES
            || !services.iter().all(|s| valid_service(s))
        {
            return Err(RegistrationError::Services);
        }
        if address.port() == 0 || address.ip().is_unspecified() {
            return Err(RegistrationError::Address(address));
        }
        let expires = Instant::now()
            .checked_add(self.ttl)
            .unwrap_or_else(Instant::now);
        let mut entries = self.lock();
        let local = &mut entries.local;
        if local.len() >= MAX_REGISTRATIONS && !local.contains_key(&proxy) {
            return Err(RegistrationError::Full);
        }
        let entry = Entry {
            services,
            address,
            expires,
        };
        let changed = match local.get_mut(&proxy) {
            Some(old) if old.services == entry.services && old.address == entry.address => {
                old.expires = entry.expires;
                false
            }
            _ => {
                tracing::info!(%proxy, %address, services = ?entry.services, "registered");
                local.insert(proxy, entry);
                true
            }
        };
        if changed {
            self.counts.registered.fetch_add(1, Ordering::Relaxed);
            self.publish(&entries);
            self.local_changed.notify_one();
        }
        Ok(())
    }

    /// Removes `proxy`'s registration now (the proxy drains); whether this replica held it.
    /// On etcd the other replicas are told as well ([`deregister_everywhere`]): a proxy that
    /// moved between replicas may have registered with another.
    pub fn deregister(&self, proxy: &str) -> bool {
        let held = self.forget(proxy);
        if held {
            self.counts.deregistered.fetch_add(1, Ordering::Relaxed);
        }
        held
    }

    /// Removes `proxy`'s registration held here, and its entry from another replica in the
    /// view (that replica removes it from etcd); whether this replica held it.
    fn forget(&self, proxy: &str) -> bool {
        let mut entries = self.lock();
        let removed = entries.local.remove(proxy);
        if let Some(entry) = &removed {
            tracing::info!(%proxy, address = %entry.address, "deregistered");
        }
        let before = entries.remote.len();
        entries.remote.retain(|(_, id), _| id != proxy);
        if removed.is_some() || entries.remote.len() != before {
            self.publish(&entries);
        }
        if removed.is_some() {
            self.local_changed.notify_one();
        }
        removed.is_some()
    }

    /// Removes the registrations expired at `now`; how many.
    pub fn expire(&self, now: Instant) -> usize {
        let mut entries = self.lock();
        let before = entries.local.len();
        entries.local.retain(|proxy, entry| {
            let alive = entry.expires > now;
            if !alive {
                tracing::info!(%proxy, address = %entry.address, "registration expired");
            }
            alive
        });
        let gone = before - entries.local.len();
        if gone > 0 {
            self.counts
                .expired
                .fetch_add(u64::try_from(gone).unwrap_or(u64::MAX), Ordering::Relaxed);
            self.publish(&entries);
            self.local_changed.notify_one();
        }
        gone
    }

    /// The registrations held here, as written in etcd: by proxy id.
    fn local_values(&self) -> BTreeMap<String, Vec<u8>> {
        self.lock()
            .local
            .iter()
            .map(|(proxy, entry)| {
                let stored = Stored {
                    services: entry.services.clone(),
                    address: entry.address,
                };
                (
                    proxy.clone(),
                    serde_json::to_vec(&stored).unwrap_or_default(),
                )
            })
            .collect()
    }

    /// Replaces the other replicas' registrations (read from etcd, by key).
    fn set_remote(&self, remote: BTreeMap<(String, String), Stored>) {
        let mut entries = self.lock();
        if entries.remote != remote {
            entries.remote = remote;
            self.publish(&entries);
        }
    }

    /// Rebuilds the view; a service whose addresses did not change keeps its entry (the same
    /// `Arc`), so streams push only the services that changed.
    fn publish(&self, entries: &Entries) {
        let mut grouped: BTreeMap<&str, BTreeSet<SocketAddr>> = BTreeMap::new();
        let local = entries.local.values().map(|e| (&e.services, e.address));
        let remote = entries.remote.values().map(|e| (&e.services, e.address));
        for (services, address) in local.chain(remote) {
            for service in services {
                grouped.entry(service).or_default().insert(address);
            }
        }
        let before = self.view.borrow().clone();
        let view: View = grouped
            .into_iter()
            .map(|(service, addresses)| {
                let addresses: Vec<SocketAddr> = addresses.into_iter().collect();
                let kept = before
                    .get(service)
                    .filter(|e| e.addresses == addresses)
                    .cloned();
                let entry =
                    kept.unwrap_or_else(|| Arc::new(ServiceEndpoints::new(service, addresses)));
                (service.to_string(), entry)
            })
            .collect();
        let same = view.len() == before.len()
            && view
                .iter()
                .zip(before.iter())
                .all(|((a, x), (b, y))| a == b && Arc::ptr_eq(x, y));
        if !same {
            self.view.send_replace(Arc::new(view));
        }
    }
}

/// Sweeps expired registrations ten times per TTL, forever.
pub async fn expire_loop(registry: Arc<ServiceRegistry>) {
    let period = (registry.ttl / SWEEPS_PER_TTL).max(Duration::from_millis(10));
    let mut ticker = tokio::time::interval(period);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticker.tick().await;
        registry.expire(Instant::now());
    }
}

/// Most writes in one etcd transaction (etcd's default limit is 128 operations).
const MAX_TXN_OPS: usize = 64;
/// Shortest pause between two writes of a replica's registrations: short, since a drain's
/// deregistration waits on it to reach the other replicas' subscribers.
const WRITE_INTERVAL: Duration = Duration::from_millis(50);

/// Writes the registrations held here under `registry/<replica>/` with the replica's lease
/// whenever they change, forever; everything again under each new lease.
pub async fn publish_registrations(
    etcd: EtcdStore,
    registry: Arc<ServiceRegistry>,
    replica: Arc<Replica>,
) {
    let mut leases = replica.leases();
    let base = format!("{}{}/", etcd.key(REGISTRY), replica.name);
    let mut written: Option<(i64, BTreeMap<String, Vec<u8>>)> = None;
    loop {
        let lease = *leases.borrow_and_update();
        let ok = match lease {
            None => {
                // Nothing can be written without a lease; all of it goes under the next one.
                written = None;
                true
            }
            Some(lease) => {
                let before = match written.take() {
                    Some((l, values)) if l == lease => values,
                    _ => BTreeMap::new(),
                };
                let now = registry.local_values();
                let ok = write_changes(&etcd, &base, lease, &before, &now).await;
                written = ok.then_some((lease, now));
                ok
            }
        };
        if ok {
            if !crate::replica::next_write(&registry.local_changed, &mut leases, WRITE_INTERVAL)
                .await
            {
                return;
            }
        } else {
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    }
}

/// Puts what is new or changed in `now` against `before`, deletes what is gone; false when
/// etcd did not take it (all of it is then written again).
async fn write_changes(
    etcd: &EtcdStore,
    base: &str,
    lease: i64,
    before: &BTreeMap<String, Vec<u8>>,
    now: &BTreeMap<String, Vec<u8>>,
) -> bool {
    use etcd_client::{DeleteOptions, PutOptions, Txn, TxnOp};
    let puts = now
        .iter()
        .filter(|(id, value)| before.get(*id) != Some(value))
        .map(|(id, value)| {
            TxnOp::put(
                format!("{base}{id}"),
                value.clone(),
                Some(PutOptions::new().with_lease(lease)),
            )
        });
    let deletes = before
        .keys()
        .filter(|id| !now.contains_key(*id))
        .map(|id| TxnOp::delete(format!("{base}{id}"), None::<DeleteOptions>));
    let ops: Vec<TxnOp> = puts.chain(deletes).collect();
    let mut kv = etcd.client.kv_client();
    for batch in ops.chunks(MAX_TXN_OPS) {
        let txn = Txn::new().and_then(batch.to_vec());
        let failed = match tokio::time::timeout(etcd.timeout(), kv.txn(txn)).await {
            Ok(Ok(_)) => continue,
            Ok(Err(e)) => e.to_string(),
            Err(_) => format!("no answer within {:?}", etcd.timeout()),
        };
        tracing::warn!(error = %failed, "cannot write the registrations to etcd; writing them all again");
        return false;
    }
    true
}

/// Where a replica that took a proxy's deregistration says so (`registry/~deregistered/<proxy>`,
/// under its lease): `~` is in no replica's name. Every replica forgets the proxy's
/// registration when the key is written ([`watch_registrations`]).
const DEREGISTERED: &str = "~deregistered/";

/// [`ServiceRegistry::deregister`], and on etcd tells every replica (the proxy may have moved
/// here from the one it registered with, which would keep its entry until the TTL): writes
/// `registry/~deregistered/<proxy>` under this replica's lease, waiting at most the etcd
/// timeout. Whether the other replicas were told (always true on a state directory).
pub async fn deregister_everywhere(
    registry: &ServiceRegistry,
    replica: &Replica,
    proxy: &str,
) -> bool {
    registry.deregister(proxy);
    let Some(etcd) = replica.etcd() else {
        return true;
    };
    let Some(lease) = *replica.leases().borrow() else {
        tracing::warn!(%proxy, "no etcd lease: the other replicas keep this proxy's registration until it expires");
        return false;
    };
    let key = format!("{}{DEREGISTERED}{proxy}", etcd.key(REGISTRY));
    let options = etcd_client::PutOptions::new().with_lease(lease);
    let mut kv = etcd.client.kv_client();
    match tokio::time::timeout(
        etcd.timeout(),
        kv.put(key, replica.name.as_str(), Some(options)),
    )
    .await
    {
        Ok(Ok(_)) => true,
        Ok(Err(e)) => {
            tracing::warn!(%proxy, error = %e, "cannot tell the other replicas of a deregistration; they keep it until it expires");
            false
        }
        Err(_) => {
            tracing::warn!(%proxy, "no answer from etcd telling the other replicas of a deregistration; they keep it until it expires");
            false
        }
    }
}

/// What a key under `registry/` is.
enum RegistryKey {
    /// `<replica>/<proxy>`: a registration.
    Registration(String, String),
    /// `~deregistered/<proxy>`: the proxy deregistered through some replica.
    Deregistered(String),
}

/// `key` (under `prefix`, `registry/`) read.
fn registry_key(prefix: &str, key: &str) -> Option<RegistryKey> {
    let rest = key.strip_prefix(prefix)?;
    if let Some(proxy) = rest.strip_prefix(DEREGISTERED) {
        return Some(RegistryKey::Deregistered(proxy.to_string()));
    }
    let (replica, proxy) = rest.split_once('/')?;
    Some(RegistryKey::Registration(
        replica.to_string(),
        proxy.to_string(),
    ))
}

/// Keeps the other replicas' registrations (`registry/` but this replica's) in `registry`,
/// forever: reads them whole, then follows a watch from that revision; reads again whenever
/// the watch ends. A deregistration taken by any replica removes the proxy's registration
/// here as well.
pub async fn watch_registrations(
    etcd: EtcdStore,
    registry: Arc<ServiceRegistry>,
    replica: Arc<Replica>,
) {
    let prefix = etcd.key(REGISTRY);
    let own = format!("{prefix}{}/", replica.name);
    loop {
        if let Err(error) = follow(&etcd, &registry, &prefix, &own).await {
            tracing::info!(%error, "the registry watch ended; reading it again");
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

async fn follow(
    etcd: &EtcdStore,
    registry: &ServiceRegistry,
    prefix: &str,
    own: &str,
) -> Result<(), String> {
    use etcd_client::{EventType, GetOptions, WatchOptions};
    let timeout = etcd.timeout();
    let mut kv = etcd.watcher.kv_client();
    let read = tokio::time::timeout(
        timeout,
        kv.get(prefix, Some(GetOptions::new().with_prefix())),
    )
    .await
    .map_err(|_| format!("no answer within {timeout:?}"))?
    .map_err(|e| e.to_string())?;
    let revision = read.header().map_or(0, |h| h.revision());
    let mut remote = BTreeMap::new();
    for kv in read.kvs() {
        let key = String::from_utf8_lossy(kv.key()).into_owned();
        if let (false, Some(RegistryKey::Registration(replica, proxy)), Ok(stored)) = (
            key.starts_with(own),
            registry_key(prefix, &key),
            serde_json::from_slice::<Stored>(kv.value()),
        ) {
            remote.insert((replica, proxy), stored);
        }
    }
    registry.set_remote(remote.clone());
    let options = WatchOptions::new()
        .with_prefix()
        .with_start_revision(revision.saturating_add(1));
    let mut client = etcd.watcher.watch_client();
    let mut stream = tokio::time::timeout(timeout, client.watch(prefix, Some(options)))
        .await
        .map_err(|_| format!("no answer within {timeout:?}"))?
        .map_err(|e| e.to_string())?;
    loop {
        let message = stream
            .message()
            .await
            .map_err(|e| e.to_string())?
            .ok_or("the watch stream ended")?;
        if message.canceled() || message.compact_revision() > 0 {
            return Err(format!("watch canceled: {}", message.cancel_reason()));
        }
        for event in message.events() {
            let Some(kv) = event.kv() else { continue };
            let key = String::from_utf8_lossy(kv.key()).into_owned();
            if key.starts_with(own) {
                continue;
            }
            let key = match registry_key(prefix, &key) {
                Some(RegistryKey::Registration(replica, proxy)) => (replica, proxy),
                Some(RegistryKey::Deregistered(proxy)) => {
                    if event.event_type() == EventType::Put {
                        // Taken by another replica: the registration held here (from before
                        // the proxy moved) goes now, not at its TTL.
                        remote.retain(|(_, id), _| *id != proxy);
                        registry.set_remote(remote.clone());
                        registry.forget(&proxy);
                    }
                    continue;
                }
                None => continue,
            };
            match event.event_type() {
                EventType::Put => match serde_json::from_slice::<Stored>(kv.value()) {
                    Ok(stored) => {
                        remote.insert(key, stored);
                    }
                    Err(_) => {
                        remote.remove(&key);
                    }
                },
                EventType::Delete => {
                    remote.remove(&key);
                }
            }
        }
        registry.set_remote(remote.clone());
    }
}

/// What a subscription stream sent of each registry service, to push only what changed.
#[derive(Default)]
pub struct Sent(HashMap<String, Option<Arc<ServiceEndpoints>>>);

impl Sent {
    /// The lines to send for `services` (the subscriber's `discovery: registry` services) given
    /// `view`: each service whose addresses differ from what was sent last (an empty set for
    /// one with none, once). Records them as sent.
    pub fn due(&mut self, services: &[String], view: &View) -> Vec<Bytes> {
        let mut lines = Vec::new();
        for service in services {
            let now = view.get(service);
            let unchanged = match (self.0.get(service), now) {
                (Some(Some(sent)), Some(now)) => Arc::ptr_eq(sent, now),
                (Some(None), None) => true,
                _ => false,
            };
            if unchanged {
                continue;
            }
            lines.push(match now {
                Some(entry) => entry.line.clone(),
                None => ServiceEndpoints::new(service, Vec::new()).line,
            });
            self.0.insert(service.clone(), now.cloned());
        }
        // A service the policy no longer has is forgotten: if it comes back, it is sent again.
        self.0.retain(|service, _| services.contains(service));
        lines
    }
}

fn valid_service(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 253
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_'))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn registration(proxy: &str, services: &[&str], address: &str) -> Registration {
        Registration {
            proxy: proxy.into(),
            services: services.iter().map(|s| s.to_string()).collect(),
            address: address.parse().expect("address"),
        }
    }

    fn addresses(registry: &ServiceRegistry, service: &str) -> Vec<String> {
        registry
            .view()
            .get(service)
            .map(|e| e.addresses.iter().map(ToString::to_string).collect())
            .unwrap_or_default()
    }

    #[tokio::test(start_paused = true)]
    async fn registrations_expire_after_the_ttl_unless_renewed() {
        let registry = Arc::new(ServiceRegistry::new(Duration::from_secs(2)));
        registry
            .register(registration("a", &["pay"], "127.0.0.1:1"))
            .expect("registered");
        registry
            .register(registration("b", &["pay", "bill"], "127.0.0.1:2"))
            .expect("registered");
        assert_eq!(addresses(&registry, "pay"), ["127.0.0.1:1", "127.0.0.1:2"]);
        let sweeper = tokio::spawn(expire_loop(Arc::clone(&registry)));
        // `a` renews every 600 ms; `b` stops renewing.
        let started = Instant::now();
        let mut view = registry.subscribe();
        view.borrow_and_update();
        let renewing = {
            let registry = Arc::clone(&registry);
            tokio::spawn(async move {
                loop {
                    tokio::time::sleep(Duration::from_millis(600)).await;
                    registry
                        .register(registration("a", &["pay"], "127.0.0.1:1"))
                        .expect("renewed");
                }
            })
        };
        view.changed().await.expect("open");
        let gone_after = started.elapsed();
        assert!(
            gone_after >= Duration::from_secs(2)
                && gone_after <= Duration::from_secs(2) + Duration::from_millis(200),
            "{gone_after:?}"
        );
        assert_eq!(addresses(&registry, "pay"), ["127.0.0.1:1"]);
        assert_eq!(addresses(&registry, "bill"), Vec::<String>::new());
        // Renewals that change nothing publish nothing.
        tokio::time::sleep(Duration::from_secs(10)).await;
        assert!(!view.has_changed().expect("open"));
        renewing.abort();
        sweeper.abort();
    }

    #[test]
    fn a_deregistration_leaves_at_once_and_unchanged_services_keep_their_entry() {
        let registry = ServiceRegistry::new(DEFAULT_TTL);
        registry
            .register(registration("a", &["pay"], "127.0.0.1:1"))
            .expect("registered");
        registry
            .register(registration("b", &["bill"], "127.0.0.1:2"))
            .expect("registered");
        let bill = Arc::clone(&registry.view()["bill"]);
        let mut sent = Sent::default();
        let services = vec!["pay".to_string(), "bill".to_string(), "none".to_string()];
        assert_eq!(sent.due(&services, &registry.view()).len(), 3);
        assert!(sent.due(&services, &registry.view()).is_empty());
        assert!(registry.deregister("a"));
        assert!(!registry.deregister("a"));
        assert!(Arc::ptr_eq(&bill, &registry.view()["bill"]));
        let due = sent.due(&services, &registry.view());
        assert_eq!(
            due,
            [Bytes::from_static(
                b"{\"type\":\"endpoints\",\"service\":\"pay\",\"addresses\":[]}\n"
            )]
        );
    }

    #[test]
    fn bad_registrations_are_refused() {
        let registry = ServiceRegistry::new(DEFAULT_TTL);
        let bad = [
            (
                registration("", &["pay"], "127.0.0.1:1"),
                RegistrationError::Proxy,
            ),
            (
                registration("a", &[], "127.0.0.1:1"),
                RegistrationError::Services,
            ),
            (
                registration("a", &["p/y"], "127.0.0.1:1"),
                RegistrationError::Services,
            ),
            (
                registration("a", &["pay"], "0.0.0.0:80"),
                RegistrationError::Address("0.0.0.0:80".parse().expect("addr")),
            ),
            (
                registration("a", &["pay"], "127.0.0.1:0"),
                RegistrationError::Address("127.0.0.1:0".parse().expect("addr")),
            ),
        ];
        for (registration, error) in bad {
            assert_eq!(registry.register(registration), Err(error));
        }
        assert!(registry.view().is_empty());
    }

    #[test]
    fn registry_keys_name_a_registration_or_a_deregistration() {
        let prefix = "/outrider/registry/";
        assert!(matches!(
            registry_key(prefix, "/outrider/registry/r-1/pay/x"),
            Some(RegistryKey::Registration(r, p)) if r == "r-1" && p == "pay/x"
        ));
        assert!(matches!(
            registry_key(prefix, "/outrider/registry/~deregistered/pay-1"),
            Some(RegistryKey::Deregistered(p)) if p == "pay-1"
        ));
        assert!(registry_key(prefix, "/outrider/registry/r-1").is_none());
        assert!(registry_key(prefix, "/other/registry/r-1/p").is_none());
    }

    #[tokio::test(start_paused = true)]
    async fn forgetting_a_proxy_drops_it_from_the_view_wherever_it_registered() {
        let registry = ServiceRegistry::new(Duration::from_secs(60));
        registry
            .register(registration("pay-1", &["pay"], "127.0.0.1:7001"))
            .expect("local");
        let remote = Stored {
            services: vec!["pay".into()],
            address: "127.0.0.1:7002".parse().expect("address"),
        };
        registry.set_remote(BTreeMap::from([
            (("r-2".to_string(), "pay-1".to_string()), remote.clone()),
            (("r-2".to_string(), "pay-2".to_string()), remote),
        ]));
        assert_eq!(addresses(&registry, "pay").len(), 2);
        assert!(registry.forget("pay-1"));
        assert_eq!(addresses(&registry, "pay"), ["127.0.0.1:7002"]);
        // Forgetting is no deregistration here: only the replica the proxy asked counts it.
        assert_eq!(registry.counts().deregistered, 0);
    }
}
