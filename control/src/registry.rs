//! The proxies the control plane knows, one live session each.
//!
//! Any token holder may subscribe or ACK, so a proxy's record only changes through its own
//! session: a subscription gets a random session id (the [`outrider_config::wire::SESSION_HEADER`] of its
//! answer) that its ACKs must carry, a second subscription under a proxy id with a live session
//! is refused unless it presents that session's id (the same proxy reconnecting before its old
//! stream was noticed gone), and an ACK counts only for a policy that session was sent.

use std::collections::{BTreeMap, VecDeque};
use std::io::Read as _;
use std::net::SocketAddr;

use outrider_config::wire::Ack;

use crate::api::{now_ms, Nack};

/// Proxies remembered after they disconnect, at most; beyond it the disconnected are dropped.
const MAX_PROXY_RECORDS: usize = 50_000;
/// Policies remembered per session as sent, for its ACKs (newest kept).
const SENT_KEPT: usize = 8;

/// One proxy as the control plane knows it.
#[derive(Debug)]
pub(crate) struct ProxyRecord {
    pub(crate) workload: String,
    pub(crate) connection: u64,
    /// The live (or last) session's id; its ACKs carry it.
    session: String,
    pub(crate) connected: bool,
    pub(crate) peer: Option<SocketAddr>,
    pub(crate) connected_since_ms: u64,
    /// When the live session opened.
    connected_at: tokio::time::Instant,
    pub(crate) version_sent: Option<u64>,
    /// (version, content hash, when the version was committed) sent in this session, newest
    /// last. The commit time is kept only for versions committed while the session was open,
    /// and taken by the first ACK of the version: push latency counts each push once.
    sent: VecDeque<(u64, String, Option<tokio::time::Instant>)>,
    pub(crate) version_applied: Option<u64>,
    pub(crate) hash_applied: Option<String>,
    pub(crate) applied_at_ms: Option<u64>,
    pub(crate) last_nack: Option<Nack>,
    /// When its last stream closed (`None` while connected); the record expires after that.
    disconnected_at: Option<tokio::time::Instant>,
    /// The same, in ms since the Unix epoch, for status.
    pub(crate) disconnected_at_ms: Option<u64>,
    /// When the newest version of this session was sent, in ms since the Unix epoch.
    pub(crate) last_sent_at_ms: Option<u64>,
}

/// A subscription the registry accepted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Session {
    /// Closes it in [`Engine::disconnected`](crate::engine::Engine::disconnected).
    pub connection: u64,
    /// What its ACKs must carry.
    pub id: String,
}

/// Why a subscription was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SubscribeRefused {
    /// Another subscription under the same proxy id is live.
    #[error(
        "proxy `{0}` already has a live subscription; a second one must present its session id"
    )]
    Live(String),
}

/// A report the registry took.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Acked {
    /// The proxy applied the policy; `latency`: since the version's commit, the first time
    /// this session reports it (and only for a version committed while it was subscribed).
    Ack {
        /// Commit to ACK.
        latency: Option<std::time::Duration>,
    },
    /// The proxy refused the policy and kept its previous one.
    Nack,
}

/// Why an ACK was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum AckRefused {
    /// No such proxy, or the ACK's session is not its live one.
    #[error("no live session `{session}` for proxy `{proxy}`")]
    Session {
        /// The proxy named.
        proxy: String,
        /// The session the ACK carried.
        session: String,
    },
    /// The session was never sent this policy.
    #[error("proxy `{proxy}` was never sent version {version} with hash `{hash}` in this session")]
    NotSent {
        /// The proxy.
        proxy: String,
        /// The version the ACK named.
        version: u64,
        /// The hash the ACK named.
        hash: String,
    },
}

/// The proxies, by id.
#[derive(Debug, Default)]
pub(crate) struct Registry {
    proxies: BTreeMap<String, ProxyRecord>,
    next_connection: u64,
}

impl Registry {
    /// Every proxy, by id.
    pub(crate) fn iter(&self) -> impl Iterator<Item = (&String, &ProxyRecord)> {
        self.proxies.iter()
    }

    /// Opens a session for `proxy`, refused while another is live unless `claimed` is its id.
    pub(crate) fn connect(
        &mut self,
        proxy: &str,
        workload: &str,
        peer: Option<SocketAddr>,
        claimed: Option<&str>,
    ) -> Result<Session, SubscribeRefused> {
        if let Some(record) = self.proxies.get(proxy) {
            if record.connected && claimed != Some(record.session.as_str()) {
                return Err(SubscribeRefused::Live(proxy.to_string()));
            }
        }
        if self.proxies.len() >= MAX_PROXY_RECORDS && !self.proxies.contains_key(proxy) {
            self.proxies.retain(|_, p| p.connected);
        }
        self.next_connection = self.next_connection.saturating_add(1);
        let session = Session {
            connection: self.next_connection,
            id: session_id(self.next_connection),
        };
        let now = now_ms();
        let started = tokio::time::Instant::now();
        let record = self
            .proxies
            .entry(proxy.to_string())
            .or_insert_with(|| ProxyRecord {
                workload: workload.to_string(),
                connection: 0,
                session: String::new(),
                connected: false,
                peer,
                connected_since_ms: now,
                connected_at: started,
                version_sent: None,
                sent: VecDeque::new(),
                version_applied: None,
                hash_applied: None,
                applied_at_ms: None,
                last_nack: None,
                disconnected_at: None,
                disconnected_at_ms: None,
                last_sent_at_ms: None,
            });
        if record.workload != workload {
            // Another workload's policy: what it applied before says nothing now.
            record.version_applied = None;
            record.hash_applied = None;
            record.applied_at_ms = None;
            record.last_nack = None;
        }
        record.workload = workload.to_string();
        record.connection = session.connection;
        record.session.clone_from(&session.id);
        record.connected = true;
        record.disconnected_at = None;
        record.disconnected_at_ms = None;
        record.last_sent_at_ms = None;
        record.peer = peer;
        record.connected_since_ms = now;
        record.connected_at = started;
        record.version_sent = None;
        record.sent.clear();
        Ok(session)
    }

    /// Records that `version` (hashing to `hash`, committed at `committed_at` when this
    /// process committed it) was written to `proxy`'s stream, or that the proxy resumed with
    /// it and was not sent it again.
    pub(crate) fn sent(
        &mut self,
        proxy: &str,
        connection: u64,
        version: u64,
        hash: &str,
        committed_at: Option<tokio::time::Instant>,
    ) {
        if let Some(record) = self.proxies.get_mut(proxy) {
            if record.connection == connection {
                record.version_sent = Some(version);
                record.last_sent_at_ms = Some(now_ms());
                if record.sent.len() >= SENT_KEPT {
                    record.sent.pop_front();
                }
                // A version older than the session is an initial sync, not a push.
                let pushed = committed_at.filter(|at| *at >= record.connected_at);
                record.sent.push_back((version, hash.to_string(), pushed));
            }
        }
    }

    /// Records that a stream closed (unless the proxy already opened a newer one).
    pub(crate) fn disconnected(&mut self, proxy: &str, connection: u64) -> bool {
        match self.proxies.get_mut(proxy) {
            Some(record) if record.connection == connection => {
                record.connected = false;
                record.disconnected_at = Some(tokio::time::Instant::now());
                record.disconnected_at_ms = Some(now_ms());
                true
            }
            _ => false,
        }
    }

    /// Forgets the proxies whose last stream closed at least `after` before `now`; returns
    /// how many.
    pub(crate) fn expire(
        &mut self,
        now: tokio::time::Instant,
        after: std::time::Duration,
    ) -> usize {
        let before = self.proxies.len();
        self.proxies.retain(|_, p| {
            p.connected
                || p.disconnected_at
                    .is_none_or(|at| now.saturating_duration_since(at) < after)
        });
        before.saturating_sub(self.proxies.len())
    }

    /// Records an ACK or NACK of the proxy's live session, for a policy that session was sent.
    /// An ACK counts at the version the control plane sent, whatever version it names.
    pub(crate) fn ack(&mut self, ack: Ack) -> Result<Acked, AckRefused> {
        let record = self
            .proxies
            .get_mut(&ack.proxy)
            .filter(|r| r.connected && r.session == ack.session)
            .ok_or_else(|| AckRefused::Session {
                proxy: ack.proxy.clone(),
                session: ack.session.clone(),
            })?;
        let now = now_ms();
        match ack.error {
            None => {
                // The same content may have been sent at several versions (a change undone):
                // the one the ACK names, else the latest.
                let sent_hash = |(_, h, _): &&(u64, String, _)| *h == ack.content_hash;
                let named = record
                    .sent
                    .iter()
                    .find(|(v, h, _)| *v == ack.version && *h == ack.content_hash);
                let Some(&(version, _, _)) =
                    named.or_else(|| record.sent.iter().rev().find(sent_hash))
                else {
                    return Err(AckRefused::NotSent {
                        proxy: ack.proxy,
                        version: ack.version,
                        hash: ack.content_hash,
                    });
                };
                let latency = record
                    .sent
                    .iter_mut()
                    .filter(|(v, _, _)| *v == version)
                    .filter_map(|(_, _, at)| at.take())
                    .min()
                    .map(|at| at.elapsed());
                record.version_applied = Some(version);
                record.hash_applied = Some(ack.content_hash);
                record.applied_at_ms = Some(now);
                tracing::info!(proxy = %ack.proxy, version, "ACK");
                Ok(Acked::Ack { latency })
            }
            Some(error) => {
                if !record.sent.iter().any(|(v, _, _)| *v == ack.version) {
                    return Err(AckRefused::NotSent {
                        proxy: ack.proxy,
                        version: ack.version,
                        hash: ack.content_hash,
                    });
                }
                tracing::warn!(proxy = %ack.proxy, version = ack.version, error, "NACK: the proxy kept its previous policy");
                record.last_nack = Some(Nack {
                    version: ack.version,
                    error,
                    at_ms: now,
                });
                Ok(Acked::Nack)
            }
        }
    }
}

/// 128 random bits, hex; from the kernel, or (should /dev/urandom be unreadable) from the
/// standard library's randomly keyed hasher and the connection number.
fn session_id(connection: u64) -> String {
    let mut bytes = [0u8; 16];
    let random = std::fs::File::open("/dev/urandom").and_then(|mut f| f.read_exact(&mut bytes));
    if random.is_err() {
        use std::hash::{BuildHasher, Hasher};
        for (i, chunk) in bytes.chunks_mut(8).enumerate() {
            let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
            hasher.write_u64(connection);
            hasher.write_usize(i);
            chunk.copy_from_slice(&hasher.finish().to_le_bytes());
        }
    }
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ack(session: &str, version: u64, hash: &str, error: Option<&str>) -> Ack {
        Ack {
            proxy: "p1".into(),
            workload: "w".into(),
            version,
            content_hash: hash.into(),
            error: error.map(String::from),
            session: session.into(),
        }
    }

    #[test]
    fn a_live_session_is_kept_from_a_second_subscription_and_forged_acks() {
        let mut registry = Registry::default();
        let first = registry.connect("p1", "w", None, None).expect("first");
        assert_eq!(first.id.len(), 32);
        registry.sent("p1", first.connection, 3, "h3", None);
        registry.sent("p1", first.connection, 4, "h4", None);
        registry.sent("p1", first.connection, 5, "h3", None);

        // Another subscriber claiming p1: refused, the record untouched.
        assert_eq!(
            registry.connect("p1", "other", None, None),
            Err(SubscribeRefused::Live("p1".into()))
        );
        assert_eq!(
            registry.connect("p1", "other", None, Some("guess")),
            Err(SubscribeRefused::Live("p1".into()))
        );
        // ACKs without the session, or for what was never sent: refused.
        assert!(matches!(
            registry.ack(ack("guess", 3, "h3", None)),
            Err(AckRefused::Session { .. })
        ));
        assert!(matches!(
            registry.ack(ack(&first.id, 99_999, "forged", None)),
            Err(AckRefused::NotSent { .. })
        ));
        assert!(matches!(
            registry.ack(ack(&first.id, 99_999, "h3", Some("no"))),
            Err(AckRefused::NotSent { .. })
        ));
        // The real ACK counts at the version sent, whatever version it names.
        registry
            .ack(ack(&first.id, 3, "h3", None))
            .expect("real ack");
        let applied = |r: &Registry| r.iter().next().expect("p1").1.version_applied;
        assert_eq!(applied(&registry), Some(3));
        registry
            .ack(ack(&first.id, 99_999, "h3", None))
            .expect("real ack");
        assert_eq!(applied(&registry), Some(5));
        assert_eq!(registry.iter().next().expect("p1").1.workload, "w");

        // The same proxy proving its session takes over; the old stream's close changes nothing.
        let second = registry
            .connect("p1", "w", None, Some(&first.id))
            .expect("same proxy");
        assert!(!registry.disconnected("p1", first.connection));
        assert!(registry.ack(ack(&first.id, 3, "h3", None)).is_err());
        // Once it is gone, anyone may subscribe under its id.
        assert!(registry.disconnected("p1", second.connection));
        registry.connect("p1", "w", None, None).expect("gone");
    }

    #[tokio::test(start_paused = true)]
    async fn push_latency_runs_from_commit_to_the_first_ack_of_a_push() {
        use std::time::Duration;
        let mut registry = Registry::default();
        let before = tokio::time::Instant::now();
        tokio::time::advance(Duration::from_secs(5)).await;
        let session = registry.connect("p1", "w", None, None).expect("connect");
        // Committed before the session opened: an initial sync, not timed.
        registry.sent("p1", session.connection, 1, "h1", Some(before));
        assert_eq!(
            registry.ack(ack(&session.id, 1, "h1", None)),
            Ok(Acked::Ack { latency: None })
        );
        let committed = tokio::time::Instant::now();
        tokio::time::advance(Duration::from_millis(40)).await;
        registry.sent("p1", session.connection, 2, "h2", Some(committed));
        tokio::time::advance(Duration::from_millis(210)).await;
        assert_eq!(
            registry.ack(ack(&session.id, 2, "h2", None)),
            Ok(Acked::Ack {
                latency: Some(Duration::from_millis(250))
            })
        );
        // The same ACK again is not a second push.
        assert_eq!(
            registry.ack(ack(&session.id, 2, "h2", None)),
            Ok(Acked::Ack { latency: None })
        );
        registry.sent("p1", session.connection, 3, "h3", Some(committed));
        assert_eq!(
            registry.ack(ack(&session.id, 3, "h3", Some("bad"))),
            Ok(Acked::Nack)
        );
    }
}
