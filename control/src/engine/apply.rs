//! The change transaction: documents parsed before the writer lock (prepare), checked against
//! what is in force and merged per workload (validate: [`plan`](super::plan)), then written
//! and published as one version ([`commit`](super::commit)), redone on the newer state when
//! another replica committed first.

use std::time::Instant;

use super::commit::FileSync;
use super::persist::Committer;
use super::plan::Prepared;
use super::{Change, Engine, EngineError, Outcome, MAX_CONFLICTS};
use crate::metrics::VersionCause;
use crate::store::Source;

impl Engine {
    /// Validates and applies `changes` as one version (when any is accepted), persists it, and
    /// pushes the workloads whose merged policy changed.
    pub fn apply(&self, changes: Vec<Change>, cause: &str) -> Result<Outcome, EngineError> {
        self.apply_by(changes, cause, None)
    }

    /// Like [`Self::apply`], but changes nothing once `deadline` has passed (the client that
    /// asked has given up by then, and must not find its change applied later): checked when
    /// the writer lock is taken and again just before the new version is committed.
    pub fn apply_by(
        &self,
        changes: Vec<Change>,
        cause: &str,
        deadline: Option<Instant>,
    ) -> Result<Outcome, EngineError> {
        let source = changes
            .iter()
            .find_map(|c| match c {
                Change::Upsert { source, .. } => Some(*source),
                Change::Remove { .. } => None,
            })
            .unwrap_or(Source::Api);
        let result = self.apply_uncounted(changes, cause, deadline);
        self.count_refusal(source, result)
    }

    fn apply_uncounted(
        &self,
        changes: Vec<Change>,
        cause: &str,
        deadline: Option<Instant>,
    ) -> Result<Outcome, EngineError> {
        // Parsing is the slow part of a change: done before the lock, so a large document
        // holds back no other change.
        self.check_overrides(&changes)?;
        let changes: Vec<Prepared> = changes.into_iter().map(Prepared::parse).collect();
        let _writer = self.lock_writer();
        check_deadline(deadline)?;
        self.check_overrides_prepared(&changes)?;
        let kind = if changes.iter().all(|c| match c {
            Prepared::Upsert { source, .. } => *source == Source::File,
            Prepared::Remove { .. } => true,
        }) {
            VersionCause::Files
        } else {
            VersionCause::Apply
        };
        self.apply_serialized(Batch {
            deadline,
            ..Batch::commit(changes, cause, Made::by(kind))
        })
    }

    /// Refuses an unforced applied upsert of a document read from the policy directory.
    fn check_overrides(&self, changes: &[Change]) -> Result<(), EngineError> {
        self.refuse_file_overrides(changes.iter().filter_map(|change| match change {
            Change::Upsert {
                name,
                source: Source::Api,
                force: false,
                ..
            } => Some(name),
            _ => None,
        }))
    }

    /// [`Self::check_overrides`] again under the writer lock (a file may have appeared since).
    fn check_overrides_prepared(&self, changes: &[Prepared]) -> Result<(), EngineError> {
        self.refuse_file_overrides(changes.iter().filter_map(|change| match change {
            Prepared::Upsert {
                name,
                source: Source::Api,
                force: false,
                ..
            } => Some(name),
            _ => None,
        }))
    }

    /// [`EngineError::OverridesFile`] for the first of `unforced` (applied upserts without
    /// `force`) whose document in force was read from the policy directory.
    fn refuse_file_overrides<'a>(
        &self,
        unforced: impl Iterator<Item = &'a String>,
    ) -> Result<(), EngineError> {
        let inner = self.lock();
        for name in unforced {
            if inner
                .docs
                .get(name)
                .is_some_and(|d| d.source == Source::File)
            {
                return Err(EngineError::OverridesFile(name.clone()));
            }
        }
        Ok(())
    }

    /// What [`Self::apply`] would do (diffs, rejections, workloads that would change, the
    /// version it would make), changing nothing and pushing nothing.
    pub fn dry_run(&self, changes: Vec<Change>) -> Result<Outcome, EngineError> {
        self.check_overrides(&changes)?;
        let changes: Vec<Prepared> = changes.into_iter().map(Prepared::parse).collect();
        let _writer = self.lock_writer();
        self.check_overrides_prepared(&changes)?;
        self.apply_serialized(Batch {
            mode: Mode::DryRun,
            ..Batch::commit(changes, "dry run", Made::by(VersionCause::Apply))
        })
    }

    /// Makes (or, in [`Mode::DryRun`], previews) `batch` as one version.
    ///
    /// The caller holds the writer lock; the data lock is taken only around in-memory work:
    /// parsing, validation and the fsync of the new state happen without it. A change
    /// [`Made::import`] (of the policy directory) commits only while this replica leads.
    pub(super) fn apply_serialized(&self, batch: Batch<'_>) -> Result<Outcome, EngineError> {
        if batch.mode == Mode::DryRun {
            return Ok(self.preview(self.plan(batch.changes)));
        }
        self.check_writable()?;
        // Another replica may commit between this one's read and its compare-and-swap: the
        // change is then redone on top of what that replica committed (validated anew: the
        // documents it merges with may have changed).
        for _ in 0..MAX_CONFLICTS {
            let plan = self.plan(batch.changes.clone());
            match self.commit(plan, &batch) {
                Err(EngineError::Conflict) => {
                    tracing::info!(
                        cause = batch.cause,
                        "another replica committed first; redoing the change on its version"
                    );
                    self.reload()?;
                }
                other => return other,
            }
        }
        Err(EngineError::Contended)
    }
}

/// What [`Engine::apply_serialized`] makes into one version, and how.
#[derive(Debug)]
pub(super) struct Batch<'a> {
    /// The changes, parsed, in order.
    pub(super) changes: Vec<Prepared>,
    /// Why: the version's cause, as recorded in the history and logged.
    pub(super) cause: &'a str,
    /// Set for a sync of the policy directory, whose file hashes are recorded with the
    /// version.
    pub(super) files: Option<FileSync>,
    /// Made, or only shown.
    pub(super) mode: Mode,
    /// Nothing changes once it has passed (the client that asked has given up).
    pub(super) deadline: Option<Instant>,
    /// Its metrics cause, and who may commit it.
    pub(super) made: Made,
}

impl<'a> Batch<'a> {
    /// `changes` committed for `cause` as `made`: no file sync, no deadline.
    pub(super) fn commit(changes: Vec<Prepared>, cause: &'a str, made: Made) -> Self {
        Self {
            changes,
            cause,
            files: None,
            mode: Mode::Commit,
            deadline: None,
            made,
        }
    }
}

/// Whether a change is made or only shown.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Mode {
    /// Validated and reported, nothing changed or pushed ([`Engine::dry_run`]).
    DryRun,
    /// Validated, written, made the view and pushed.
    Commit,
}

/// What makes a change: its `cause` label, and who may commit it (only the leader imports
/// the policy directory).
#[derive(Debug, Clone, Copy)]
pub(super) struct Made {
    /// The `cause` label of the version metric.
    pub(super) cause: VersionCause,
    /// Who may commit it.
    pub(super) committer: Committer,
}

impl Made {
    /// A change for `cause` that any replica commits.
    pub(super) fn by(cause: VersionCause) -> Self {
        Self {
            cause,
            committer: Committer::AnyReplica,
        }
    }

    /// The import of the policy directory, committed only while this replica leads.
    pub(super) fn import() -> Self {
        Self {
            cause: VersionCause::Files,
            committer: Committer::Leader,
        }
    }
}

/// [`EngineError::Expired`] once `deadline` has passed.
pub(super) fn check_deadline(deadline: Option<Instant>) -> Result<(), EngineError> {
    match deadline {
        Some(deadline) if Instant::now() >= deadline => Err(EngineError::Expired),
        _ => Ok(()),
    }
}
