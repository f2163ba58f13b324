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
//! control plane has them back within a third of the TTL, as proxies renew.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use bytes::Bytes;
use outrider_config::wire::{
    EndpointsUpdate, Registration, ServerMessage, MAX_REGISTERED_SERVICES,
};
use tokio::sync::watch;
use tokio::time::Instant;

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

/// The registrations of the proxies, by proxy id, and the view pushed from them.
pub struct ServiceRegistry {
    ttl: Duration,
    entries: Mutex<HashMap<String, Entry>>,
    view: watch::Sender<Arc<View>>,
}

impl ServiceRegistry {
    /// An empty registry whose registrations live `ttl` unless renewed.
    pub fn new(ttl: Duration) -> Self {
        Self {
            ttl,
            entries: Mutex::new(HashMap::new()),
            view: watch::Sender::new(Arc::new(View::new())),
        }
    }

    /// The registration TTL.
    pub fn ttl(&self) -> Duration {
        self.ttl
    }

    /// The view, for a subscription stream.
    pub fn subscribe(&self) -> watch::Receiver<Arc<View>> {
        self.view.subscribe()
    }

    /// The view now.
    pub fn view(&self) -> Arc<View> {
        Arc::clone(&self.view.borrow())
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<String, Entry>> {
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
        if entries.len() >= MAX_REGISTRATIONS && !entries.contains_key(&proxy) {
            return Err(RegistrationError::Full);
        }
        let entry = Entry {
            services,
            address,
            expires,
        };
        let changed = match entries.get_mut(&proxy) {
            Some(old) if old.services == entry.services && old.address == entry.address => {
                old.expires = entry.expires;
                false
            }
            _ => {
                tracing::info!(%proxy, %address, services = ?entry.services, "registered");
                entries.insert(proxy, entry);
                true
            }
        };
        if changed {
            self.publish(&entries);
        }
        Ok(())
    }

    /// Removes `proxy`'s registration now; whether it had one.
    pub fn deregister(&self, proxy: &str) -> bool {
        let mut entries = self.lock();
        let removed = entries.remove(proxy);
        if let Some(entry) = &removed {
            tracing::info!(%proxy, address = %entry.address, "deregistered");
            self.publish(&entries);
        }
        removed.is_some()
    }

    /// Removes the registrations expired at `now`; how many.
    pub fn expire(&self, now: Instant) -> usize {
        let mut entries = self.lock();
        let before = entries.len();
        entries.retain(|proxy, entry| {
            let alive = entry.expires > now;
            if !alive {
                tracing::info!(%proxy, address = %entry.address, "registration expired");
            }
            alive
        });
        let gone = before - entries.len();
        if gone > 0 {
            self.publish(&entries);
        }
        gone
    }

    /// Rebuilds the view; a service whose addresses did not change keeps its entry (the same
    /// `Arc`), so streams push only the services that changed.
    fn publish(&self, entries: &HashMap<String, Entry>) {
        let mut grouped: BTreeMap<&str, BTreeSet<SocketAddr>> = BTreeMap::new();
        for entry in entries.values() {
            for service in &entry.services {
                grouped.entry(service).or_default().insert(entry.address);
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

/// Sweeps expired registrations, [`SWEEPS_PER_TTL`] times per TTL, forever.
pub async fn expire_loop(registry: Arc<ServiceRegistry>) {
    let period = (registry.ttl / SWEEPS_PER_TTL).max(Duration::from_millis(10));
    let mut ticker = tokio::time::interval(period);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticker.tick().await;
        registry.expire(Instant::now());
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
}
