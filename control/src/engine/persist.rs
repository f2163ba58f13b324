//! The view and the store: writing a new version (or a head whose rejections alone changed),
//! and reading back what other replicas committed. The view is the in-memory copy every read
//! is served from; it changes only after the store took the write.

use std::collections::BTreeMap;
use std::time::Instant;

use super::publish::republish;
use super::{load_policy, Engine, EngineError, Inner, MAX_CONFLICTS};
use crate::metrics::StoreOp;
use crate::rejections::Rejections;
use crate::store::{Commit, Source, State, StoreError};

/// Who may commit a write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Committer {
    /// Any replica: an applied change, a delete, a rollback.
    AnyReplica,
    /// Only the leader, and only while it holds its lease: the import of the policy directory,
    /// which every replica watches but one must commit.
    Leader,
}

impl Engine {
    /// Writes `state` to the state directory, recording how the write fared; a failed file
    /// sync's `cause` is recorded as pending in the same step, so status never shows the one
    /// without the other.
    pub(super) fn save(
        &self,
        state: &State,
        file_sync: Option<&str>,
        committer: Committer,
        commit: Commit,
    ) -> Result<i64, EngineError> {
        let started = Instant::now();
        let saved = self
            .store
            .commit(state, commit, committer == Committer::Leader);
        self.metrics
            .store_operation(StoreOp::Save, started.elapsed());
        let mut inner = self.lock();
        let health = &mut inner.store_health;
        match saved {
            Ok(revision) => {
                if health.recovered() {
                    tracing::info!(store = %self.store.describe(), "the store takes writes again");
                }
                Ok(revision)
            }
            // Not a failure of the store: the change is redone on the newer state.
            Err(StoreError::Conflict) => Err(EngineError::Conflict),
            // Not a failure either: the leader imports the change.
            Err(StoreError::NotLeader) => Err(EngineError::NotLeader),
            Err(source) => {
                health.failed(&source, file_sync);
                if source.is_unavailable() {
                    return Err(EngineError::Unavailable(source));
                }
                Err(EngineError::Store {
                    place: match self.store.etcd_store() {
                        Some(_) => self.store.describe(),
                        None => format!("the state directory {}", self.store.describe()),
                    },
                    source,
                })
            }
        }
    }

    /// Commits `state`, whose rejections alone changed, as the head (no new version), and
    /// makes it the view. The caller holds the writer lock. [`EngineError::Conflict`] and
    /// [`EngineError::NotLeader`] are the caller's to handle; on another failure the view
    /// keeps the rejections (shown by this replica only) and the change goes on without them.
    pub(super) fn commit_head(
        &self,
        mut state: State,
        committer: Committer,
    ) -> Result<(), EngineError> {
        match self.save(&state, None, committer, Commit::Head) {
            Ok(revision) => {
                state.revision = revision;
                self.lock().state = state;
                Ok(())
            }
            Err(e @ (EngineError::Conflict | EngineError::NotLeader)) => Err(e),
            Err(e) => {
                tracing::warn!(error = %e, "rejections not recorded in the store; only this replica shows them");
                self.lock().state.rejections = state.rejections;
                Ok(())
            }
        }
    }

    /// [`Self::commit_head`] of the view's rejections as `change`d (when it says it changed
    /// them), redone on the newer state when another replica committed first. The caller
    /// holds the writer lock.
    pub(super) fn commit_rejections(
        &self,
        committer: Committer,
        change: impl Fn(&mut Rejections) -> bool,
    ) -> Result<(), EngineError> {
        for _ in 0..MAX_CONFLICTS {
            let mut state = self.lock().state.clone();
            if !change(&mut state.rejections) {
                return Ok(());
            }
            match self.commit_head(state, committer) {
                Err(EngineError::Conflict) => self.reload()?,
                other => return other,
            }
        }
        Err(EngineError::Contended)
    }

    /// Fails at once while the store is known to be unreachable.
    pub(super) fn check_writable(&self) -> Result<(), EngineError> {
        if self.store.writable() {
            return Ok(());
        }
        Err(EngineError::Unavailable(StoreError::Unavailable {
            store: self.store.describe(),
            message: "no member with a leader answers (the watch is down)".into(),
        }))
    }

    /// Brings the view up to what the store holds (another replica's change, seen by the
    /// etcd watch). Takes the writer lock, so it never interleaves with a local change.
    pub fn catch_up(&self) -> Result<(), EngineError> {
        let _writer = self.lock_writer();
        self.reload()
    }

    /// Reads the state from the store and makes it the view, under the writer lock.
    pub(super) fn reload(&self) -> Result<(), EngineError> {
        let state = self.store.load().map_err(|e| {
            if e.is_unavailable() {
                EngineError::Unavailable(e)
            } else {
                EngineError::Load(e)
            }
        })?;
        self.install(state)
    }

    /// Makes `state` the view if it is newer, and pushes the workloads whose merged policy
    /// changed. The caller holds the writer lock.
    fn install(&self, state: State) -> Result<(), EngineError> {
        let (known, docs_before, parsed_before) = {
            let inner = self.lock();
            (
                inner.state.revision,
                inner.docs.clone(),
                inner.parsed.clone(),
            )
        };
        if state.revision <= known {
            return Ok(());
        }
        let docs = state.current();
        let mut parsed = BTreeMap::new();
        for (name, doc) in &docs {
            // Documents unchanged since the last view need no second parse.
            let policy = match (docs_before.get(name), parsed_before.get(name)) {
                (Some(before), Some(policy)) if before.text == doc.text => policy.clone(),
                _ => load_policy(name, &doc.text).map_err(|error| EngineError::Stored {
                    name: name.clone(),
                    error,
                })?,
            };
            parsed.insert(name.clone(), policy);
        }
        let mut inner = self.lock();
        let version = state.version;
        let from = inner.state.version;
        inner.state = state;
        inner.docs = docs;
        inner.parsed = parsed;
        // Applied documents that no longer override a file's no longer shadow it.
        let Inner { shadowed, docs, .. } = &mut *inner;
        shadowed.retain(|name, _| docs.get(name).is_some_and(|d| d.source == Source::Api));
        let workloads = republish(&mut inner, version);
        if version != from {
            tracing::info!(
                from,
                version,
                workloads = workloads.len(),
                "view caught up with the store"
            );
        }
        Ok(())
    }

    /// The store revision the view was read or written at.
    pub fn store_revision(&self) -> i64 {
        self.lock().state.revision
    }
}
