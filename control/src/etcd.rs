//! The state in etcd, shared by every replica (`--store etcd://...`).
//!
//! Keys, under the prefix (`/outrider/` by default):
//! - `state`: the head, `{format, version, seen_files, rejections}`; its `mod_revision` is what a save
//!   compares against, so versions form one sequence across replicas (see [`EtcdStore::save`]);
//! - `history/<version, 20 digits>`: each kept [`VersionRecord`], the last one in force;
//! - `ca/cert`, `ca/key`: the generated mesh CA, created once by whichever replica comes first;
//! - `leader/<lease>`: the election of the replica that imports the policy directory
//!   ([`crate::replica`]), each candidate's key under its lease;
//! - `proxies/<replica>/<proxy>`: each replica's connected proxies, under its lease;
//! - `registry/<replica>/<proxy>`: the service registrations each replica holds, under its
//!   lease ([`crate::discovery`]).
//!
//! Each replica keeps its in-memory view current with a watch on `state` ([`keep_view`]),
//! resumed after a disconnect from the revision its view was read at, and reloaded whole when
//! that revision was compacted away. While the watch is down the replica serves what it has
//! and refuses changes at once ([`EtcdStore::available`]).

use std::collections::{BTreeMap, VecDeque};
use std::future::Future;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use etcd_client::{
    Certificate, Client, Compare, CompareOp, ConnectOptions, DeleteOptions, GetOptions, Identity,
    TlsOptions, Txn, TxnOp, TxnOpResponse, WatchOptions,
};
use serde::{Deserialize, Serialize};

use crate::engine::Engine;
use crate::rejections::Rejections;
use crate::store::{Commit, State, StoreError, VersionRecord, FORMAT};

/// The default key prefix.
pub const DEFAULT_PREFIX: &str = "/outrider/";
const HEAD: &str = "state";
const HISTORY: &str = "history/";
const CA_CERT: &str = "ca/cert";
const CA_KEY: &str = "ca/key";
/// The election's name (etcd's election API keeps each candidate's key under it).
pub(crate) const LEADER: &str = "leader";
/// Each replica's proxies: `proxies/<replica>/<proxy>`.
pub(crate) const PROXIES: &str = "proxies/";
/// Prefix of the registrations each replica holds (`registry/<replica>/<proxy>`), under its
/// lease ([`crate::discovery`]).
pub(crate) const REGISTRY: &str = "registry/";
/// Longest pause between attempts to re-establish the watch.
const MAX_BACKOFF: Duration = Duration::from_secs(2);

/// How to reach etcd.
#[derive(Debug, Clone)]
pub struct EtcdConfig {
    /// `host:port` of each member.
    pub endpoints: Vec<String>,
    /// Prefix of every key.
    pub prefix: String,
    /// CA certificate (PEM) etcd's serving certificates are verified against; TLS when set.
    pub ca: Option<PathBuf>,
    /// Client certificate and key (PEM) for etcd's `--client-cert-auth`.
    pub identity: Option<(PathBuf, PathBuf)>,
    /// User and password for etcd's authentication.
    pub user: Option<(String, String)>,
    /// Deadline of each request to etcd.
    pub timeout: Duration,
}

/// Parses `etcd://host1:2379,host2:2379` into its endpoints.
pub fn parse_url(url: &str) -> Result<Vec<String>, String> {
    let rest = url
        .strip_prefix("etcd://")
        .ok_or_else(|| format!("{url:?} is not etcd://host:port[,host:port...]"))?;
    let endpoints: Vec<String> = rest
        .trim_end_matches('/')
        .split(',')
        .map(str::trim)
        .filter(|e| !e.is_empty())
        .map(str::to_string)
        .collect();
    if endpoints.is_empty() {
        return Err(format!("{url:?} names no etcd member"));
    }
    if let Some(bad) = endpoints
        .iter()
        .find(|e| e.contains('/') || !e.contains(':'))
    {
        return Err(format!("etcd member {bad:?} is not host:port"));
    }
    Ok(endpoints)
}

/// The head of the state: everything but the history records.
#[derive(Debug, Serialize, Deserialize)]
struct Head {
    format: u32,
    version: u64,
    seen_files: BTreeMap<String, String>,
    /// The rejections ([`crate::rejections`]): in the head, so recording one is a
    /// compare-and-swap like a version's, and the watch brings it to every replica.
    #[serde(default)]
    rejections: Rejections,
}

/// A connection to etcd holding the state; cheap to clone.
#[derive(Clone)]
pub struct EtcdStore {
    /// Reads and writes: they wait for a leader (within the timeout), so an election after
    /// one member's loss delays a change rather than failing it.
    pub(crate) client: Client,
    /// The watch and the lease: they require a leader, so etcd ends the watch when the
    /// quorum is lost and the replica turns read-only at once.
    pub(crate) watcher: Client,
    /// The election's campaign, which waits (unboundedly) until this replica leads: the
    /// other clients' per-request deadline would cut it, and etcd resigns a cut campaign.
    pub(crate) elector: Client,
    prefix: String,
    endpoints: String,
    timeout: Duration,
    /// The runtime the client's requests run on, so the engine's blocking callers (which may
    /// run outside it) can wait for them.
    runtime: tokio::runtime::Handle,
    /// Whether the watch is established: a leader is there and a member answers.
    available: Arc<AtomicBool>,
    /// Since when the view may be behind etcd: from the moment the watch broke until one is
    /// established again; `None` while watching.
    behind_since: Arc<Mutex<Option<tokio::time::Instant>>>,
    /// This replica's key in the election while it leads: an import of the policy directory
    /// commits only while that key exists ([`Self::save_fenced`]).
    fence: Arc<Mutex<Option<Vec<u8>>>>,
}

impl std::fmt::Debug for EtcdStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EtcdStore")
            .field("endpoints", &self.endpoints)
            .field("prefix", &self.prefix)
            .finish_non_exhaustive()
    }
}

impl EtcdStore {
    /// Connects to etcd (on `runtime`); the first read (by [`crate::engine::Engine::open`])
    /// finds out whether a member answers with a leader.
    pub async fn connect(
        config: EtcdConfig,
        runtime: tokio::runtime::Handle,
    ) -> Result<Self, StoreError> {
        let endpoints_text = config.endpoints.join(",");
        let unavailable = |message: String| StoreError::Unavailable {
            store: format!("etcd://{endpoints_text}"),
            message,
        };
        let read = |path: &PathBuf| {
            std::fs::read(path).map_err(|source| StoreError::Io {
                what: "cannot read",
                path: path.clone(),
                source,
            })
        };
        let tls = config.ca.is_some() || config.identity.is_some();
        // Keep-alives notice a member that went away without closing its connections.
        // Without a per-request deadline: the campaign's; the others add it.
        let mut options = ConnectOptions::new()
            .with_connect_timeout(config.timeout)
            .with_keep_alive(Duration::from_secs(2), Duration::from_secs(2));
        if tls {
            let mut tls_options = TlsOptions::new();
            if let Some(ca) = &config.ca {
                tls_options = tls_options.ca_certificate(Certificate::from_pem(read(ca)?));
            }
            if let Some((cert, key)) = &config.identity {
                tls_options = tls_options.identity(Identity::from_pem(read(cert)?, read(key)?));
            }
            options = options.with_tls(tls_options);
        }
        if let Some((user, password)) = &config.user {
            options = options
                .with_user(user.clone(), password.clone())
                .with_auto_token_refresh(true);
        }
        let scheme = if tls { "https" } else { "http" };
        let urls: Vec<String> = config
            .endpoints
            .iter()
            .map(|e| format!("{scheme}://{e}"))
            .collect();
        let connect = |options: ConnectOptions| {
            let urls = urls.clone();
            async move {
                tokio::time::timeout(config.timeout, Client::connect(urls, Some(options)))
                    .await
                    .map_err(|_| unavailable(format!("no answer within {:?}", config.timeout)))?
                    .map_err(|e| unavailable(e.to_string()))
            }
        };
        let elector = connect(options.clone().with_require_leader(true)).await?;
        let options = options.with_timeout(config.timeout);
        let client = connect(options.clone()).await?;
        let watcher = connect(options.with_require_leader(true)).await?;
        let mut prefix = config.prefix;
        if !prefix.ends_with('/') {
            prefix.push('/');
        }
        Ok(Self {
            client,
            watcher,
            elector,
            prefix,
            endpoints: endpoints_text,
            timeout: config.timeout,
            runtime,
            available: Arc::new(AtomicBool::new(true)),
            behind_since: Arc::new(Mutex::new(None)),
            fence: Arc::new(Mutex::new(None)),
        })
    }

    /// The deadline of each request.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// Since when the view may be behind etcd (the watch broke then and is not back); `None`
    /// while the watch is established.
    pub fn behind_since(&self) -> Option<tokio::time::Instant> {
        *self.behind_since.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn watching(&self, established: bool) {
        let mut since = self.behind_since.lock().unwrap_or_else(|e| e.into_inner());
        if established {
            *since = None;
        } else {
            since.get_or_insert_with(tokio::time::Instant::now);
        }
    }

    /// Sets (on winning the election) or clears (on losing the lease) the key an import must
    /// find to commit.
    pub(crate) fn set_fence(&self, leader_key: Option<Vec<u8>>) {
        *self.fence.lock().unwrap_or_else(|e| e.into_inner()) = leader_key;
    }

    /// `etcd://endpoints prefix`, for messages and status.
    pub fn describe(&self) -> String {
        format!("etcd://{} (prefix {})", self.endpoints, self.prefix)
    }

    /// Whether the watch is established (false from its failure until it is again).
    pub fn available(&self) -> bool {
        self.available.load(Ordering::Relaxed)
    }

    pub(crate) fn key(&self, name: &str) -> String {
        format!("{}{name}", self.prefix)
    }

    fn history_key(&self, version: u64) -> String {
        format!("{}{HISTORY}{version:020}", self.prefix)
    }

    fn unavailable(&self, e: impl std::fmt::Display) -> StoreError {
        StoreError::Unavailable {
            store: self.describe(),
            message: e.to_string(),
        }
    }

    /// A transaction, tried again within the timeout while it gets no answer: the member it
    /// reached cannot be connected to (the client balances over the members but fails a
    /// request sent to a dead one rather than routing it to another), or the attempt's share
    /// of the deadline passed (a proposal forwarded to a leader that has just died is lost,
    /// and etcd answers it only at its own request timeout of several seconds, while a new
    /// leader is elected within about one). A transaction that never reached etcd did
    /// nothing; one that did and is tried again fails its compare, which [`Self::save`] tells
    /// apart from another replica's commit, so a retry never commits twice.
    async fn txn(&self, txn: Txn) -> Result<etcd_client::TxnResponse, StoreError> {
        let deadline = tokio::time::Instant::now() + self.timeout;
        let attempt_timeout = self.timeout / 3;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            let mut kv = self.client.kv_client();
            match tokio::time::timeout(attempt_timeout.min(left), kv.txn(txn.clone())).await {
                Ok(Ok(response)) => return Ok(response),
                Ok(Err(e)) if unreachable_member(&e) && tokio::time::Instant::now() < deadline => {
                    tracing::debug!(error = %e, "etcd member unreachable; trying another");
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                Ok(Err(e)) => return Err(self.unavailable(e)),
                Err(_) if tokio::time::Instant::now() < deadline => {
                    tracing::debug!(after = ?attempt_timeout, "no answer from etcd; trying again");
                }
                Err(_) => {
                    return Err(self.unavailable(format!("no answer within {:?}", self.timeout)))
                }
            }
        }
    }

    /// Runs `request` on the client's runtime and waits for it, at most the timeout: the
    /// engine's changes are synchronous (they run on blocking threads or the file watcher's).
    fn block<T: Send + 'static>(
        &self,
        request: impl Future<Output = Result<T, StoreError>> + Send + 'static,
    ) -> Result<T, StoreError> {
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        let timeout = self.timeout;
        let late = self.unavailable(format!("no answer within {timeout:?}"));
        let late_too = late.clone_message();
        self.runtime.spawn(async move {
            let answer = tokio::time::timeout(timeout, request)
                .await
                .unwrap_or(Err(late));
            let _ = tx.send(answer);
        });
        rx.recv_timeout(timeout.saturating_add(Duration::from_secs(1)))
            .unwrap_or(Err(late_too))
    }

    /// Reads the head and the history in one transaction (one revision).
    pub fn load(&self) -> Result<State, StoreError> {
        let this = self.clone();
        self.block(async move { this.load_async().await })
    }

    async fn load_async(&self) -> Result<State, StoreError> {
        let head_key = self.key(HEAD);
        let history_key = self.key(HISTORY);
        let txn = Txn::new().and_then([
            TxnOp::get(head_key.clone(), None),
            TxnOp::get(history_key, Some(GetOptions::new().with_prefix())),
        ]);
        let response = self.txn(txn).await?;
        let mut answers = response.op_responses().into_iter();
        let (Some(TxnOpResponse::Get(head)), Some(TxnOpResponse::Get(history))) =
            (answers.next(), answers.next())
        else {
            return Err(StoreError::Invalid {
                key: head_key,
                message: "etcd answered the read with something else".into(),
            });
        };
        let Some(head_kv) = head.kvs().first() else {
            return Ok(State {
                format: FORMAT,
                ..State::default()
            });
        };
        let invalid = |key: &[u8], message: String| StoreError::Invalid {
            key: String::from_utf8_lossy(key).into_owned(),
            message,
        };
        let parsed: Head = serde_json::from_slice(head_kv.value())
            .map_err(|e| invalid(head_kv.key(), e.to_string()))?;
        if parsed.format != FORMAT {
            return Err(invalid(
                head_kv.key(),
                format!("format {}; this build reads format {FORMAT}", parsed.format),
            ));
        }
        let mut records = VecDeque::new();
        for kv in history.kvs() {
            let record: VersionRecord =
                serde_json::from_slice(kv.value()).map_err(|e| invalid(kv.key(), e.to_string()))?;
            // Keys sort by their zero-padded version, so this is oldest first.
            records.push_back(record);
        }
        let mut rejections = parsed.rejections;
        rejections.enforce_bounds();
        Ok(State {
            format: parsed.format,
            version: parsed.version,
            seen_files: parsed.seen_files,
            history: records,
            rejections,
            revision: head_kv.mod_revision(),
        })
    }

    /// Commits `state` (whose newest history record is the new version) in one transaction:
    /// only if the head is still at `state.revision` (absent when 0), it writes the head and
    /// the new record and deletes records older than the oldest kept. Otherwise another
    /// replica committed first: [`StoreError::Conflict`]. This compare-and-swap is what
    /// numbers versions: each is the head's version plus one, and only one replica's swap
    /// from a given head succeeds. [`Commit::Head`] writes the head alone (same version).
    pub fn save(&self, state: &State, commit: Commit) -> Result<i64, StoreError> {
        self.save_with(state, commit, None)
    }

    /// [`Self::save`] of an import of the policy directory: it commits only while this
    /// replica leads (its election key exists), so a replica that lost its lease mid-import
    /// cannot commit over the new leader's import; [`StoreError::NotLeader`] otherwise.
    pub fn save_fenced(&self, state: &State, commit: Commit) -> Result<i64, StoreError> {
        let fence = self
            .fence
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
            .ok_or(StoreError::NotLeader)?;
        self.save_with(state, commit, Some(fence))
    }

    fn save_with(
        &self,
        state: &State,
        commit: Commit,
        fence: Option<Vec<u8>>,
    ) -> Result<i64, StoreError> {
        let head_key = self.key(HEAD);
        let head = serde_json::to_vec(&Head {
            format: state.format.max(FORMAT),
            version: state.version,
            seen_files: state.seen_files.clone(),
            rejections: state.rejections.clone(),
        })
        .map_err(|e| StoreError::Invalid {
            key: head_key.clone(),
            message: e.to_string(),
        })?;
        let compare = if state.revision == 0 {
            Compare::create_revision(head_key.clone(), CompareOp::Equal, 0)
        } else {
            Compare::mod_revision(head_key.clone(), CompareOp::Equal, state.revision)
        };
        let mut ops = vec![TxnOp::put(head_key.clone(), head.clone(), None)];
        // What a failed compare reads back: the head and the new record as they are now.
        let mut now = vec![TxnOp::get(head_key.clone(), None)];
        let mut written = vec![head];
        let newest = state.history.back().filter(|_| commit == Commit::Version);
        if let Some(newest) = newest {
            let key = self.history_key(newest.version);
            let record = serde_json::to_vec(newest).map_err(|e| StoreError::Invalid {
                key: key.clone(),
                message: e.to_string(),
            })?;
            ops.push(TxnOp::put(key.clone(), record.clone(), None));
            now.push(TxnOp::get(key, None));
            written.push(record);
        }
        if let Some(oldest) = state.history.front().filter(|_| commit == Commit::Version) {
            ops.push(TxnOp::delete(
                self.key(HISTORY),
                Some(DeleteOptions::new().with_range(self.history_key(oldest.version))),
            ));
        }
        let mut compares = vec![compare];
        if let Some(fence) = &fence {
            compares.push(Compare::create_revision(
                fence.clone(),
                CompareOp::Greater,
                0,
            ));
            now.insert(0, TxnOp::get(fence.clone(), None));
        }
        let txn = Txn::new().when(compares).and_then(ops).or_else(now);
        let this = self.clone();
        self.block(async move {
            let response = this.txn(txn).await?;
            if response.succeeded() {
                return Ok(response.header().map_or(0, |h| h.revision()));
            }
            let mut read = response.op_responses().into_iter();
            if fence.is_some() {
                match read.next() {
                    Some(TxnOpResponse::Get(get)) if !get.kvs().is_empty() => {}
                    _ => return Err(StoreError::NotLeader),
                }
            }
            // An attempt [`Self::txn`] gave up on may have committed after all: then the head
            // and the record hold exactly what this one writes, and the swap is this replica's.
            let mut revision = None;
            for bytes in &written {
                match read.next() {
                    Some(TxnOpResponse::Get(get)) => match get.kvs().first() {
                        Some(kv) if kv.value() == bytes.as_slice() => {
                            revision.get_or_insert(kv.mod_revision());
                        }
                        _ => return Err(StoreError::Conflict),
                    },
                    _ => return Err(StoreError::Conflict),
                }
            }
            revision.ok_or(StoreError::Conflict)
        })
    }

    /// The shared generated CA, `(certificate PEM, key PEM)`: the one in etcd, or else
    /// `generate`'s, stored with a create-if-absent transaction so that replicas starting
    /// together all end up with the same one (the loser's candidate is thrown away).
    pub fn shared_ca<E>(
        &self,
        generate: impl FnOnce() -> Result<(String, String), E>,
    ) -> Result<Result<(String, String), E>, StoreError> {
        let this = self.clone();
        if let Some(pair) = self.block(async move { this.read_ca().await })? {
            return Ok(Ok(pair));
        }
        let (cert, key) = match generate() {
            Ok(pair) => pair,
            Err(e) => return Ok(Err(e)),
        };
        let this = self.clone();
        let stored = self.block(async move {
            let (cert_key, key_key) = (this.key(CA_CERT), this.key(CA_KEY));
            let txn = Txn::new()
                .when([Compare::create_revision(
                    cert_key.clone(),
                    CompareOp::Equal,
                    0,
                )])
                .and_then([
                    TxnOp::put(key_key, key.clone(), None),
                    TxnOp::put(cert_key, cert.clone(), None),
                ]);
            let response = this.txn(txn).await?;
            if response.succeeded() {
                tracing::info!(store = %this.describe(), "generated the shared mesh CA");
                return Ok(Some((cert, key)));
            }
            this.read_ca().await
        })?;
        stored.map(Ok).ok_or_else(|| StoreError::Invalid {
            key: self.key(CA_CERT),
            message: "the CA was created by another replica but cannot be read back".into(),
        })
    }

    async fn read_ca(&self) -> Result<Option<(String, String)>, StoreError> {
        let (cert_key, key_key) = (self.key(CA_CERT), self.key(CA_KEY));
        let txn = Txn::new().and_then([
            TxnOp::get(cert_key.clone(), None),
            TxnOp::get(key_key.clone(), None),
        ]);
        let response = self.txn(txn).await?;
        let mut answers = response.op_responses().into_iter();
        let (Some(TxnOpResponse::Get(cert)), Some(TxnOpResponse::Get(key))) =
            (answers.next(), answers.next())
        else {
            return Ok(None);
        };
        let text = |kvs: &[etcd_client::KeyValue], name: &str| {
            kvs.first()
                .map(|kv| {
                    String::from_utf8(kv.value().to_vec()).map_err(|e| StoreError::Invalid {
                        key: name.to_string(),
                        message: e.to_string(),
                    })
                })
                .transpose()
        };
        match (text(cert.kvs(), &cert_key)?, text(key.kvs(), &key_key)?) {
            (Some(cert), Some(key)) => Ok(Some((cert, key))),
            (None, None) => Ok(None),
            _ => Err(StoreError::Invalid {
                key: cert_key,
                message: "only half of the CA (certificate or key) is stored".into(),
            }),
        }
    }
}

/// Whether `e` says the member could not be connected to (so another may answer).
fn unreachable_member(e: &etcd_client::Error) -> bool {
    match e {
        // gRPC's UNAVAILABLE (14): the client names no type for the code.
        etcd_client::Error::GRpcStatus(status) => status.code() as i32 == 14,
        etcd_client::Error::TransportError(_) | etcd_client::Error::IoError(_) => true,
        _ => false,
    }
}

impl StoreError {
    /// A copy for a second report of the same failure (the I/O source is not `Clone`).
    fn clone_message(&self) -> Self {
        match self {
            Self::Unavailable { store, message } => Self::Unavailable {
                store: store.clone(),
                message: message.clone(),
            },
            other => Self::Unavailable {
                store: String::new(),
                message: other.to_string(),
            },
        }
    }
}

/// Why a watch ended.
enum WatchEnd {
    /// The revision to resume from was compacted away: the view was reloaded whole; watch
    /// again at once from its revision.
    Resynced,
    /// The established watch broke (its member went away): watch again at once, through
    /// another member, before calling etcd unavailable.
    Broken(String),
    /// No watch could be established (no member answers with a leader): etcd is unavailable;
    /// try again after a pause.
    Failed(String),
}

/// Keeps `engine`'s view current with etcd, forever: a watch on the state key from the view's
/// revision; each change loads the new state. The watch is re-established with a capped,
/// jittered backoff, resuming from the view's revision. When no watch can be made for the
/// request timeout (longer than an election after one member's loss), the store is marked
/// unavailable: changes are refused at once, subscriptions are served from the view.
pub async fn keep_view(store: EtcdStore, engine: Arc<Engine>) {
    let mut backoff = Duration::from_millis(100);
    let mut down_since: Option<tokio::time::Instant> = None;
    loop {
        let end = watch_once(&store, &engine, &mut backoff, &mut down_since).await;
        if !matches!(end, WatchEnd::Resynced) {
            store.watching(false);
        }
        match end {
            WatchEnd::Resynced => {
                down_since = None;
                continue;
            }
            WatchEnd::Broken(why) => {
                down_since = None;
                tracing::info!(error = %why, "etcd watch broke; watching again");
                // A short pause: a watch that keeps breaking right after it is made must not
                // spin.
                tokio::time::sleep(Duration::from_millis(20)).await;
                continue;
            }
            WatchEnd::Failed(why) => {
                let now = tokio::time::Instant::now();
                let since = *down_since.get_or_insert(now);
                if now.saturating_duration_since(since) < store.timeout {
                    tracing::info!(error = %why, "no etcd watch yet; trying again");
                } else if store.available.swap(false, Ordering::Relaxed) {
                    tracing::warn!(store = %store.describe(), error = %why, "etcd unavailable: serving the last view, refusing changes until it is back");
                } else {
                    tracing::debug!(error = %why, "etcd still unavailable");
                }
            }
        }
        // Jitter: replicas that lost etcd together do not come back in step.
        let jitter = Duration::from_millis(u64::from(rand_u8()) % 100);
        tokio::time::sleep(backoff.saturating_add(jitter)).await;
        backoff = backoff.saturating_mul(2).min(MAX_BACKOFF);
    }
}

fn rand_u8() -> u8 {
    // Enough randomness for a jitter, without a dependency: the low bits of the clock.
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| (d.subsec_nanos() >> 10) as u8)
}

/// `backoff` and `down_since` are reset once the watch is established.
async fn watch_once(
    store: &EtcdStore,
    engine: &Arc<Engine>,
    backoff: &mut Duration,
    down_since: &mut Option<tokio::time::Instant>,
) -> WatchEnd {
    let resume_from = engine.store_revision().saturating_add(1);
    let options = WatchOptions::new().with_start_revision(resume_from);
    let mut client = store.watcher.watch_client();
    let started =
        tokio::time::timeout(store.timeout, client.watch(store.key(HEAD), Some(options))).await;
    let mut stream = match started {
        Ok(Ok(stream)) => stream,
        Ok(Err(e)) => return WatchEnd::Failed(e.to_string()),
        Err(_) => return WatchEnd::Failed(format!("no answer within {:?}", store.timeout)),
    };
    let mut established = false;
    let end = |established: bool, why: String| {
        if established {
            WatchEnd::Broken(why)
        } else {
            WatchEnd::Failed(why)
        }
    };
    loop {
        let message = match stream.message().await {
            Ok(Some(message)) => message,
            Ok(None) => return end(established, "the watch stream ended".into()),
            Err(e) => return end(established, e.to_string()),
        };
        if message.compact_revision() > 0 {
            tracing::info!(
                from = resume_from,
                compacted = message.compact_revision(),
                "etcd compacted past the view's revision: reloading the whole state"
            );
            return match catch_up(engine).await {
                Ok(()) => WatchEnd::Resynced,
                Err(e) => WatchEnd::Failed(e),
            };
        }
        if message.canceled() {
            // etcd cancels a watch that requires a leader when the quorum is lost.
            return WatchEnd::Failed(format!("watch canceled: {}", message.cancel_reason()));
        }
        if message.created() {
            established = true;
            store.watching(true);
            *backoff = Duration::from_millis(100);
            *down_since = None;
            if !store.available.swap(true, Ordering::Relaxed) {
                tracing::info!(store = %store.describe(), from = resume_from, "etcd available again: watching from the view's revision");
            }
        }
        if !message.events().is_empty() {
            if let Err(e) = catch_up(engine).await {
                return end(established, e);
            }
        }
    }
}

/// Loads the state and installs it into the engine (on a blocking thread: the engine's locks
/// are not held across awaits).
async fn catch_up(engine: &Arc<Engine>) -> Result<(), String> {
    let engine = Arc::clone(engine);
    match tokio::task::spawn_blocking(move || engine.catch_up()).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(e.to_string()),
        Err(e) => Err(e.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::{Change, EngineError};
    use crate::store::{Source, Store};
    use std::io::{Read, Write};

    /// One real etcd member (Debian's etcd-server) on free loopback ports, killed and its
    /// data removed on drop. `None` when etcd is not installed, unless OUTRIDER_REQUIRE_ETCD=1.
    struct TestEtcd {
        child: std::process::Child,
        client_port: u16,
        dir: PathBuf,
    }

    impl TestEtcd {
        fn start() -> Option<Self> {
            let installed = std::process::Command::new("etcd")
                .arg("--version")
                .output()
                .is_ok_and(|o| o.status.success());
            if !installed {
                assert!(
                    std::env::var_os("OUTRIDER_REQUIRE_ETCD").is_none_or(|v| v != "1"),
                    "OUTRIDER_REQUIRE_ETCD=1 but etcd is not installed (scripts/ensure-etcd)"
                );
                eprintln!("skipped: etcd is not installed (scripts/ensure-etcd installs it)");
                return None;
            }
            let listeners: Vec<std::net::TcpListener> = (0..2)
                .map(|_| std::net::TcpListener::bind("127.0.0.1:0").expect("bind"))
                .collect();
            let ports: Vec<u16> = listeners
                .iter()
                .map(|l| l.local_addr().expect("addr").port())
                .collect();
            drop(listeners);
            let dir = std::env::temp_dir().join(format!(
                "outrider-etcd-unit-{}-{}",
                std::process::id(),
                ports[0]
            ));
            let client = format!("http://127.0.0.1:{}", ports[0]);
            let peer = format!("http://127.0.0.1:{}", ports[1]);
            let child = std::process::Command::new("etcd")
                .args(["--name", "unit", "--data-dir"])
                .arg(&dir)
                .args([
                    "--listen-client-urls",
                    &client,
                    "--advertise-client-urls",
                    &client,
                ])
                .args([
                    "--listen-peer-urls",
                    &peer,
                    "--initial-advertise-peer-urls",
                    &peer,
                ])
                .args(["--initial-cluster", &format!("unit={peer}")])
                .args(["--logger", "zap", "--log-level", "error"])
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .spawn()
                .expect("spawn etcd");
            let etcd = Self {
                child,
                client_port: ports[0],
                dir,
            };
            let deadline = std::time::Instant::now() + Duration::from_secs(30);
            while !etcd.healthy() {
                assert!(std::time::Instant::now() < deadline, "etcd never healthy");
                std::thread::sleep(Duration::from_millis(50));
            }
            Some(etcd)
        }

        fn healthy(&self) -> bool {
            let Ok(mut stream) = std::net::TcpStream::connect(("127.0.0.1", self.client_port))
            else {
                return false;
            };
            let _ = stream.set_read_timeout(Some(Duration::from_secs(2)));
            let _ = stream.write_all(b"GET /health HTTP/1.0\r\n\r\n");
            let mut answer = String::new();
            let _ = stream.take(64 * 1024).read_to_string(&mut answer);
            answer.contains("\"health\":\"true\"")
        }
    }

    impl TestEtcd {
        /// A store on this member, its requests run on `runtime`.
        fn connect(&self, runtime: &tokio::runtime::Runtime) -> EtcdStore {
            let config = EtcdConfig {
                endpoints: vec![format!("127.0.0.1:{}", self.client_port)],
                prefix: DEFAULT_PREFIX.into(),
                ca: None,
                identity: None,
                user: None,
                timeout: Duration::from_secs(5),
            };
            runtime
                .block_on(EtcdStore::connect(config, runtime.handle().clone()))
                .expect("connect")
        }
    }

    impl Drop for TestEtcd {
        fn drop(&mut self) {
            let _ = self.child.kill();
            let _ = self.child.wait();
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }

    fn upsert(name: &str, workload: &str) -> Change {
        Change::Upsert {
            name: name.into(),
            text: format!("workload: {workload}\nservices: {{}}\n"),
            source: Source::Api,
            force: false,
        }
    }

    #[test]
    fn a_replica_with_a_stale_view_redoes_its_change_on_the_newer_version() {
        let Some(etcd) = TestEtcd::start() else {
            return;
        };
        let runtime = tokio::runtime::Runtime::new().expect("runtime");
        let open = || Engine::open(Store::etcd(etcd.connect(&runtime))).expect("engine");
        // Two replicas without their watches: each view stays at what it read, so every
        // change of one makes the other's next compare-and-swap fail.
        let (a, b) = (open(), open());
        assert_eq!(
            a.apply(vec![upsert("one", "one")], "a").expect("a").version,
            1
        );
        let out = b.apply(vec![upsert("two", "two")], "b").expect("b");
        assert_eq!(
            out.version, 2,
            "redone on top of version 1, not a second version 1"
        );
        assert_eq!(
            a.apply(vec![upsert("three", "three")], "a")
                .expect("a")
                .version,
            3
        );
        for engine in [&a, &b] {
            engine.catch_up().expect("catch up");
            let history = engine.history();
            let versions: Vec<u64> = history.iter().map(|h| h.version).collect();
            assert_eq!(versions, [3, 2, 1]);
            assert_eq!(history[0].documents, ["one", "three", "two"]);
        }
        // The generated CA: the first replica's stays, the second gets the same one.
        let first = a_ca(&runtime, &etcd);
        assert_eq!(first, a_ca(&runtime, &etcd));
    }

    #[test]
    fn a_rejection_recorded_by_one_replica_is_every_replicas() {
        let Some(etcd) = TestEtcd::start() else {
            return;
        };
        let runtime = tokio::runtime::Runtime::new().expect("runtime");
        let open = || Engine::open(Store::etcd(etcd.connect(&runtime))).expect("engine");
        let rejected = |engine: &Engine| -> Vec<String> {
            engine
                .status()
                .documents
                .into_iter()
                .filter(|d| d.rejected.is_some())
                .map(|d| d.name)
                .collect()
        };
        let (a, b) = (open(), open());
        a.apply(vec![upsert("one", "one")], "a").expect("one");
        // B's view is behind (no watch): its rejection is recorded on top of version 1, and
        // makes no version.
        let bad = Change::Upsert {
            name: "bad".into(),
            text: "services: [\n".into(),
            source: Source::Api,
            force: false,
        };
        let out = b.apply(vec![bad], "b").expect("answered");
        assert_eq!((out.rejected.len(), out.version), (1, 1));
        a.catch_up().expect("catch up");
        assert_eq!(rejected(&a), ["bad"]);
        assert_eq!(a.version(), 1);
        assert_eq!(open().history().len(), 1);
        // Accepted on A: gone on B as well.
        a.apply(vec![upsert("bad", "bad")], "a").expect("bad");
        b.catch_up().expect("catch up");
        assert!(rejected(&b).is_empty());
        assert_eq!(b.version(), 2);
    }

    #[test]
    fn a_view_behind_a_compaction_is_reloaded_whole_by_the_watch() {
        let Some(etcd) = TestEtcd::start() else {
            return;
        };
        let runtime = tokio::runtime::Runtime::new().expect("runtime");
        let connect = || etcd.connect(&runtime);
        let a = Engine::open(Store::etcd(connect())).expect("a");
        // B reads the empty state, then is away while A makes two versions and etcd
        // compacts the revisions B would resume from.
        let b_store = connect();
        let b = Arc::new(Engine::open(Store::etcd(b_store.clone())).expect("b"));
        a.apply(vec![upsert("one", "one")], "a").expect("one");
        a.apply(vec![upsert("two", "two")], "a").expect("two");
        let mut client = b_store.client.clone();
        runtime
            .block_on(client.compact(a.store_revision(), None))
            .expect("compact");
        runtime.spawn(keep_view(b_store, Arc::clone(&b)));
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while b.version() != 2 {
            assert!(std::time::Instant::now() < deadline, "B never caught up");
            std::thread::sleep(Duration::from_millis(10));
        }
        assert_eq!(b.history()[0].documents, ["one", "two"]);
        // And the watch then follows A's next change.
        a.apply(vec![upsert("three", "three")], "a").expect("three");
        while b.version() != 3 {
            assert!(std::time::Instant::now() < deadline, "B missed version 3");
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    #[test]
    fn an_import_commits_only_while_the_leaders_election_key_exists() {
        let Some(etcd) = TestEtcd::start() else {
            return;
        };
        let runtime = tokio::runtime::Runtime::new().expect("runtime");
        let store = etcd.connect(&runtime);
        let engine = Engine::open(Store::etcd(store.clone())).expect("engine");
        let import = |workload: &str| {
            let file = crate::engine::ScannedFile {
                text: format!("workload: {workload}\nservices: {{}}\n"),
                modified: std::time::SystemTime::now(),
            };
            let scan = BTreeMap::from([("a.yaml".to_string(), file)]);
            engine.sync_files(scan, &std::collections::BTreeSet::new())
        };
        // Never elected: refused, nothing changes.
        assert!(matches!(import("one"), Err(EngineError::NotLeader)));
        // Elected: its key exists under its lease.
        let mut client = store.client.clone();
        let lease = runtime
            .block_on(client.lease_grant(30, None))
            .expect("lease")
            .id();
        let key = store.key("leader/test");
        let put = etcd_client::PutOptions::new().with_lease(lease);
        runtime
            .block_on(client.put(key.clone(), "me", Some(put)))
            .expect("put");
        store.set_fence(Some(key.into_bytes()));
        let imported = import("one").expect("imported").expect("a version");
        assert_eq!(imported.version, 1);
        // The lease is gone (another replica may lead now): refused, nothing changes.
        runtime
            .block_on(client.lease_revoke(lease))
            .expect("revoke");
        assert!(matches!(import("two"), Err(EngineError::NotLeader)));
        engine.catch_up().expect("catch up");
        assert_eq!(engine.version(), 1);
        // And an apply (not an import) needs no leadership.
        let applied = engine.apply(vec![upsert("b", "b")], "b").expect("apply");
        assert_eq!(applied.version, 2);
    }

    fn a_ca(runtime: &tokio::runtime::Runtime, etcd: &TestEtcd) -> (String, String) {
        let store = etcd.connect(runtime);
        let mut generated = 0;
        let pair = store
            .shared_ca(|| {
                generated += 1;
                Ok::<_, ()>((format!("cert {generated}"), "key".to_string()))
            })
            .expect("etcd")
            .expect("generated");
        pair
    }

    #[test]
    fn urls_name_members() {
        assert_eq!(
            parse_url("etcd://a:2379,b:2379/").expect("parsed"),
            ["a:2379", "b:2379"]
        );
        assert!(parse_url("http://a:2379").is_err());
        assert!(parse_url("etcd://").is_err());
        assert!(parse_url("etcd://a").is_err());
    }
}
