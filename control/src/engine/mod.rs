//! The control plane's core: the documents in force, accepting or rejecting changes, versions,
//! the merged policy each workload's proxies receive, and what each proxy reported.
//!
//! One mutex guards it all: changes are rare and small, and the only frequent callers
//! (subscriptions opening and closing, ACKs) hold it for a map update. Pushing is not done under
//! it by iterating proxies: each workload has a [`watch`] channel whose value is the
//! pre-encoded update line, and every subscription task waits on its receiver, so an accepted
//! change costs one encode per workload whatever the number of proxies.
//!
//! Here: the [`Engine`], its view (`Inner`) and the vocabulary of changes. Each concept has
//! its file, using what this one defines:
//! - `apply`: the change transaction, prepared before the writer lock, then planned
//!   (validated and merged per workload) and committed or, for a dry run, previewed;
//! - `files`: the policy directory's import; `delete`: a document removed or handed back to
//!   its file; `history`: the kept versions and rollback;
//! - `persist`: writing to the store and catching up with other replicas' commits; `health`:
//!   how the store takes writes;
//! - `publish`: each workload's merged, encoded policy and its channel;
//! - `proxies`: sessions, ACKs, expiry and proxy statuses; `status`: the API's `status`.

use std::collections::{BTreeMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use outrider_config::wire;
use outrider_config::{Policy, PolicyError};
use tokio::sync::watch;

use crate::api::{Applied, Rejected, WorkloadVersion};
use crate::metrics::{ControlMetrics, RejectReason, StoreOp};
use crate::registry::Registry;
use crate::store::{Source, State, Store, StoreError, StoredDoc, HISTORY_LEN};

mod apply;
mod commit;
mod delete;
mod files;
mod health;
mod history;
mod persist;
mod plan;
mod proxies;
mod publish;
mod status;
#[cfg(test)]
mod tests;

pub use files::ScannedFile;
use health::StoreHealth;
pub use proxies::{expire_gone, Forgotten};
pub use publish::Published;
use publish::{republish, settle_versions};

/// The pseudo-workload of workloads that no document names: defaults only.
pub const DEFAULTS: &str = "*";

/// A change to the set of documents.
#[derive(Debug, Clone)]
pub enum Change {
    /// Add or replace a document.
    Upsert {
        /// Its name (file name or applied name).
        name: String,
        /// Its YAML.
        text: String,
        /// Where it came from.
        source: Source,
        /// For an applied document: override a document read from the policy directory
        /// (refused otherwise, [`EngineError::OverridesFile`]).
        force: bool,
    },
    /// Remove a document (its file was deleted).
    Remove {
        /// Its name.
        name: String,
    },
}

/// What became of a batch of changes.
#[derive(Debug, Clone, Default)]
pub struct Outcome {
    /// The version in force afterwards (new when anything was accepted).
    pub version: u64,
    /// Documents accepted (changed or removed).
    pub accepted: Vec<String>,
    /// Documents identical to the ones in force.
    pub unchanged: Vec<String>,
    /// Documents rejected; the previous version of each stays in force.
    pub rejected: Vec<Rejected>,
    /// Unified diff of each accepted upsert against the text it replaced.
    pub diffs: BTreeMap<String, String>,
    /// Workloads whose merged policy changed.
    pub workloads: Vec<WorkloadVersion>,
    /// What was accepted but will do nothing yet (a Gateway API route whose parent Service no
    /// document has), in words for the operator.
    pub warnings: Vec<String>,
}

impl Outcome {
    /// The API answer for a single applied document.
    pub fn applied(&self, name: &str) -> Applied {
        Applied {
            version: self.version,
            unchanged: self.unchanged.iter().any(|n| n == name),
            diff: self.diffs.get(name).cloned().unwrap_or_default(),
            workloads: self.workloads.clone(),
            warnings: self.warnings.clone(),
        }
    }
}

/// Failures that are not a document's fault.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// The persisted state could not be read at start.
    #[error("{0}")]
    Load(#[from] StoreError),
    /// The new version could not be written to the state directory; nothing changed.
    #[error("cannot write the new version to {place}: {source}; nothing changed")]
    Store {
        /// `the state directory DIR`, or etcd's endpoints.
        place: String,
        /// What failed.
        source: StoreError,
    },
    /// etcd cannot be reached or has no quorum: this replica serves its last view and makes
    /// no change until etcd is back.
    #[error("not changed: the store is unavailable, so this replica is read-only until it is back (proxies keep the policy in force): {0}")]
    Unavailable(StoreError),
    /// Other replicas kept committing first, [`MAX_CONFLICTS`] times in a row.
    #[error(
        "not changed: other replicas committed {MAX_CONFLICTS} versions in a row first; try again"
    )]
    Contended,
    /// An import of the policy directory by a replica that lost its leadership (its lease)
    /// before committing: nothing changed here; the new leader imports the directory.
    #[error("not imported: this replica no longer leads; the leader imports the policy directory")]
    NotLeader,
    /// Another replica committed first (internal: the change is redone on its state).
    #[error("another replica committed first")]
    Conflict,
    /// Rollback to a version no longer (or never) kept.
    #[error("version {0} is not in the kept history")]
    NotKept(u64),
    /// The request's deadline passed before the change could be made; nothing changed.
    #[error("not applied: the request's deadline passed while waiting for another change to finish; nothing changed")]
    Expired,
    /// `delete` of a document not in force.
    #[error("no document named {0} is in force (see outriderctl status)")]
    UnknownDocument(String),
    /// `delete` of a document read from the policy directory: the file would bring it back.
    #[error("{0} comes from the policy directory: delete the file instead")]
    FileBacked(String),
    /// `apply` without `force` of a document read from the policy directory.
    #[error("{0} comes from the policy directory: edit the file, or apply with --force to override it (the file's changes then wait until `outriderctl delete {0}` hands the document back to the file)")]
    OverridesFile(String),
    /// A kept version no longer loads (written by another build).
    #[error("stored document {name} no longer loads: {error}")]
    Stored {
        /// The document.
        name: String,
        /// Why.
        error: PolicyError,
    },
}

/// A change retried this many times when another replica committed first, before giving up.
pub const MAX_CONFLICTS: usize = 8;

/// `text`'s policy as a document named `name` (what a change, an import and a catch-up parse).
fn load_policy(name: &str, text: &str) -> Result<Policy, PolicyError> {
    outrider_config::load_document(name, text).map(|loaded| loaded.policy)
}

/// The view: what every read is served from, replaced only after the store took a write.
struct Inner {
    /// As last read from or written to the store.
    state: State,
    /// The documents in force, and their parsed policies.
    docs: BTreeMap<String, StoredDoc>,
    parsed: BTreeMap<String, Policy>,
    /// Each workload's channel, carrying its merged policy.
    published: BTreeMap<String, watch::Sender<Arc<Published>>>,
    /// Published workloads no stream watches and no document names, since when (first seen
    /// so by [`Engine::expire`]).
    unwatched: BTreeMap<String, tokio::time::Instant>,
    proxies: Registry,
    store_health: StoreHealth,
    /// Policy-directory files overridden by an applied document of the same name (forced
    /// apply): their text as last scanned, handed back by `delete`.
    shadowed: BTreeMap<String, String>,
    /// When the versions committed by this process were (the last [`HISTORY_LEN`]): push
    /// latency is measured from there to each ACK.
    committed: VecDeque<(u64, tokio::time::Instant)>,
}

impl Inner {
    /// Notes that `version` was committed now.
    fn committed(&mut self, version: u64) {
        if self.committed.len() >= HISTORY_LEN {
            self.committed.pop_front();
        }
        self.committed
            .push_back((version, tokio::time::Instant::now()));
    }
}

/// The control plane's state; share it as `Arc<Engine>`.
///
/// Two locks: `writer` serializes the changes (apply, file sync, rollback), and is held while
/// a new version is validated and fsynced; `inner` guards the data and is only ever held for
/// in-memory work, so status reads, subscriptions and ACKs never wait for a disk.
pub struct Engine {
    store: Store,
    /// Longest update line a change may produce for any workload (see [`Self::max_push`]).
    max_push: usize,
    writer: Mutex<()>,
    inner: Mutex<Inner>,
    /// Notified when a proxy's record changes (for [`crate::replica::publish_proxies`]).
    proxies_changed: Arc<tokio::sync::Notify>,
    metrics: ControlMetrics,
}

impl Engine {
    /// Loads the persisted state (documents in force, history) from `store`.
    pub fn open(store: Store) -> Result<Self, EngineError> {
        let metrics = ControlMetrics::new();
        let started = Instant::now();
        let state = store.load();
        metrics.store_operation(StoreOp::Load, started.elapsed());
        let state = state?;
        let docs = state.current();
        let mut parsed = BTreeMap::new();
        for (name, doc) in &docs {
            let loaded = outrider_config::load_document(name, &doc.text).map_err(|error| {
                EngineError::Stored {
                    name: name.clone(),
                    error,
                }
            })?;
            parsed.insert(name.clone(), loaded.policy);
        }
        let mut inner = Inner {
            state,
            docs,
            parsed,
            published: BTreeMap::new(),
            unwatched: BTreeMap::new(),
            proxies: Registry::default(),
            store_health: StoreHealth::default(),
            shadowed: BTreeMap::new(),
            committed: VecDeque::new(),
        };
        let version = inner.state.version;
        republish(&mut inner, version);
        settle_versions(&mut inner);
        Ok(Self {
            store,
            max_push: wire::MAX_LINE,
            writer: Mutex::new(()),
            inner: Mutex::new(inner),
            proxies_changed: Arc::new(tokio::sync::Notify::new()),
            metrics,
        })
    }

    /// The counters and histograms of `/metrics`.
    pub fn metrics(&self) -> &ControlMetrics {
        &self.metrics
    }

    /// Counts a change refused as a whole.
    fn count_refusal<T>(
        &self,
        source: Source,
        result: Result<T, EngineError>,
    ) -> Result<T, EngineError> {
        if let Some(reason) = result.as_ref().err().and_then(RejectReason::of) {
            self.metrics.rejected(source, reason);
        }
        result
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic while holding the lock leaves consistent data (every update is a whole
        // replacement), so a poisoned lock is still usable.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Taken before [`Self::lock`] by everything that changes the documents, the state or
    /// the rejections, so that between its reads and its commit nothing else does.
    fn lock_writer(&self) -> MutexGuard<'_, ()> {
        self.writer.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Refuses changes whose merged policy for some workload encodes into an update line
    /// longer than `bytes` (at most [`wire::MAX_LINE`], what a proxy reads), so a proxy never
    /// receives a policy it cannot read.
    pub fn max_push(mut self, bytes: usize) -> Self {
        self.max_push = bytes.min(wire::MAX_LINE);
        self
    }

    /// The version in force.
    pub fn version(&self) -> u64 {
        self.lock().state.version
    }
}
