//! The change transaction: documents parsed before the writer lock (prepare), checked against
//! what is in force and merged per workload (validate), then written and published as one
//! version (commit), redone on the newer state when another replica committed first.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Instant;

use outrider_config::{Policy, PolicyError};

use super::persist::Committer;
use super::publish::{
    encode, identity, merged_yaml, named_workloads, remerge, republish, MergeFailure,
};
use super::{load_policy, Change, Engine, EngineError, Outcome, DEFAULTS, MAX_CONFLICTS};
use crate::api::{now_ms, ApiDiagnostic, Rejected};
use crate::merge;
use crate::metrics::{ApplyResult, RejectReason, VersionCause};
use crate::store::{Commit, Source, StoredDoc, VersionRecord};

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
        self.apply_serialized(changes, cause, None, Mode::Commit, deadline, Made::by(kind))
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
        self.apply_serialized(
            changes,
            "dry run",
            None,
            Mode::DryRun,
            None,
            Made::by(VersionCause::Apply),
        )
    }

    /// Makes (or, in [`Mode::DryRun`], previews) `changes` as one version. `files`: set for a
    /// sync of the policy directory, whose file hashes are recorded with the version.
    ///
    /// The caller holds the writer lock; the data lock is taken only around in-memory work:
    /// parsing, validation and the fsync of the new state happen without it. A change
    /// [`Made::import`] (of the policy directory) commits only while this replica leads.
    pub(super) fn apply_serialized(
        &self,
        changes: Vec<Prepared>,
        cause: &str,
        files: Option<FileSync>,
        mode: Mode,
        deadline: Option<Instant>,
        made: Made,
    ) -> Result<Outcome, EngineError> {
        if mode == Mode::DryRun {
            return Ok(self.preview(self.plan(changes)));
        }
        self.check_writable()?;
        // Another replica may commit between this one's read and its compare-and-swap: the
        // change is then redone on top of what that replica committed (validated anew: the
        // documents it merges with may have changed).
        for _ in 0..MAX_CONFLICTS {
            let plan = self.plan(changes.clone());
            match self.commit(plan, cause, files.clone(), deadline, made) {
                Err(EngineError::Conflict) => {
                    tracing::info!(
                        cause,
                        "another replica committed first; redoing the change on its version"
                    );
                    self.reload()?;
                }
                other => return other,
            }
        }
        Err(EngineError::Contended)
    }

    /// Validates `changes` against the view, in order: each document alone, then every
    /// workload it merges into. Changes nothing; the caller holds the writer lock, so the view
    /// stays what the plan was made on.
    fn plan(&self, changes: Vec<Prepared>) -> Plan {
        let (version, mut docs, mut parsed) = {
            let inner = self.lock();
            (
                inner.state.version + 1,
                inner.docs.clone(),
                inner.parsed.clone(),
            )
        };
        let mut outcome = Outcome::default();
        let mut sources: BTreeMap<String, Source> = BTreeMap::new();
        let mut reasons: Vec<(Source, RejectReason)> = Vec::new();
        for change in changes {
            match change {
                Prepared::Upsert {
                    name,
                    text,
                    source,
                    policy,
                    ..
                } => {
                    sources.insert(name.clone(), source);
                    // Same text from another source is a change of owner (a forced apply).
                    if docs
                        .get(&name)
                        .is_some_and(|d| d.text == text && d.source == source)
                    {
                        outcome.unchanged.push(name);
                        continue;
                    }
                    let policy = match *policy {
                        Ok(policy) => policy,
                        Err(error) => {
                            outcome
                                .rejected
                                .push(rejected_invalid(&name, &text, &error, source));
                            reasons.push((source, RejectReason::Invalid));
                            continue;
                        }
                    };
                    let old = parsed.insert(name.clone(), policy);
                    if let Err(Unmergeable { reason, message }) =
                        check_merges(&name, old.as_ref(), &parsed, self.max_push)
                    {
                        reasons.push((source, reason));
                        match old {
                            Some(old) => parsed.insert(name.clone(), old),
                            None => parsed.remove(&name),
                        };
                        outcome.rejected.push(rejected_unmergeable(
                            &name,
                            message,
                            source == Source::File,
                        ));
                        continue;
                    }
                    let previous = docs.get(&name);
                    let diff = similar::TextDiff::from_lines(
                        previous.map_or("", |d| d.text.as_str()),
                        text.as_str(),
                    )
                    .unified_diff()
                    .header(
                        &previous.map_or_else(
                            || format!("{name} (none)"),
                            |d| format!("{name} (version {})", d.changed_at),
                        ),
                        &format!("{name} (version {version})"),
                    )
                    .to_string();
                    outcome.diffs.insert(name.clone(), diff);
                    docs.insert(
                        name.clone(),
                        StoredDoc {
                            text,
                            source,
                            changed_at: version,
                        },
                    );
                    outcome.accepted.push(name);
                }
                Prepared::Remove { name } => {
                    if let Some(removed) = docs.remove(&name) {
                        sources.insert(name.clone(), removed.source);
                        parsed.remove(&name);
                        outcome.accepted.push(name);
                    }
                }
            }
        }
        outcome.warnings = unparented_routes(&outcome.accepted, &parsed);
        Plan {
            version,
            outcome,
            docs,
            parsed,
            sources,
            reasons,
        }
    }

    /// What committing `plan` would do: the version it would make and the workloads whose
    /// merged policy would change.
    fn preview(&self, plan: Plan) -> Outcome {
        let Plan {
            version,
            mut outcome,
            parsed,
            ..
        } = plan;
        let inner = self.lock();
        if outcome.accepted.is_empty() {
            outcome.version = inner.state.version;
        } else {
            outcome.version = version;
            outcome.workloads = remerge(&inner.published, &parsed, version)
                .iter()
                .map(|(workload, published)| identity(workload, published))
                .collect();
        }
        outcome
    }

    /// Writes `plan` as a new version (or, when it accepts nothing, its rejections alone as
    /// the head), makes it the view and pushes the workloads whose merged policy changed.
    /// Nothing is written once `deadline` has passed.
    fn commit(
        &self,
        plan: Plan,
        cause: &str,
        files: Option<FileSync>,
        deadline: Option<Instant>,
        made: Made,
    ) -> Result<Outcome, EngineError> {
        let Plan {
            version,
            mut outcome,
            docs,
            parsed,
            sources,
            reasons,
        } = plan;
        let mut inner = self.lock();
        let mut rejections = inner.state.rejections.clone();
        for name in outcome.accepted.iter().chain(&outcome.unchanged) {
            rejections.clear(name);
        }
        for rejected in &outcome.rejected {
            tracing::warn!(document = %rejected.document, error = %rejected.message, "document rejected; its previous version stays in force");
            rejections.record(rejected);
        }
        for (source, reason) in reasons {
            self.metrics.applied(source, ApplyResult::Rejected);
            self.metrics.rejected(source, reason);
        }
        let count = |names: &[String], result: ApplyResult| {
            for name in names {
                let source = sources.get(name).copied().unwrap_or(Source::Api);
                self.metrics.applied(source, result);
            }
        };
        count(&outcome.unchanged, ApplyResult::Unchanged);
        // A sync of the policy directory: its changes are pending while they cannot be written.
        let file_sync = files.is_some();
        let seen =
            files.map(|files| files.seen_after(outcome.accepted.iter().chain(&outcome.unchanged)));
        if outcome.accepted.is_empty() {
            if let Some(seen) = seen {
                inner.state.seen_files = seen;
                inner.store_health.files_written();
            }
            outcome.version = inner.state.version;
            if rejections != inner.state.rejections {
                // Recorded in the store, so that every replica shows it.
                let mut state = inner.state.clone();
                state.rejections = rejections;
                drop(inner);
                self.commit_head(state, made.committer)?;
            }
            return Ok(outcome);
        }
        let mut state = inner.state.clone();
        state.rejections = rejections;
        if let Some(seen) = seen {
            state.seen_files = seen;
        }
        state.push(VersionRecord {
            version,
            at_ms: now_ms(),
            cause: cause.to_string(),
            documents: docs.clone(),
        });
        drop(inner);
        check_deadline(deadline)?;
        // Durable before anyone sees it: a version a proxy applied must survive a restart.
        state.revision = self.save(
            &state,
            file_sync.then_some(cause),
            made.committer,
            Commit::Version,
        )?;
        let mut inner = self.lock();
        if file_sync {
            inner.store_health.files_written();
        }
        // A file's document now applied over: its text waits for `delete`.
        for name in &outcome.accepted {
            let overridden = inner.docs.get(name).filter(|d| d.source == Source::File);
            if let (Some(old), Some(new)) = (overridden, docs.get(name)) {
                if new.source == Source::Api {
                    let text = old.text.clone();
                    inner.shadowed.insert(name.clone(), text);
                }
            }
            if docs.get(name).is_some_and(|d| d.source == Source::File) {
                inner.shadowed.remove(name);
            }
        }
        inner.state = state;
        inner.docs = docs;
        inner.parsed = parsed;
        inner.committed(version);
        outcome.version = version;
        outcome.workloads = republish(&mut inner, version);
        drop(inner);
        count(&outcome.accepted, ApplyResult::Accepted);
        self.metrics.version(made.cause);
        tracing::info!(version, cause, accepted = %outcome.accepted.join(","), workloads = outcome.workloads.len(), "version accepted");
        Ok(outcome)
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
    cause: VersionCause,
    committer: Committer,
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

/// A sync of the policy directory: the file hashes recorded with its version. A rejected
/// file's hash is not recorded, so it is retried on the next scan (it may be accepted once
/// the document it conflicts with is gone).
#[derive(Debug, Clone)]
pub(super) struct FileSync {
    /// The files' hashes after the scan, without the upserted ones.
    pub(super) seen: BTreeMap<String, String>,
    /// The upserted files' hashes, recorded when accepted or unchanged.
    pub(super) upserted: BTreeMap<String, String>,
}

impl FileSync {
    /// The hashes to record once `settled` (the accepted and unchanged documents) are in force.
    fn seen_after<'a>(self, settled: impl Iterator<Item = &'a String>) -> BTreeMap<String, String> {
        let Self { mut seen, upserted } = self;
        for name in settled {
            if let Some(hash) = upserted.get(name) {
                seen.insert(name.clone(), hash.clone());
            }
        }
        seen
    }
}

/// A batch of changes validated against the view, not yet committed.
struct Plan {
    /// The version committing it makes.
    version: u64,
    /// Accepted, unchanged and rejected documents, and the diffs (its version and workloads
    /// are filled in by the commit or the preview).
    outcome: Outcome,
    /// The documents in force once committed, and their parsed policies.
    docs: BTreeMap<String, StoredDoc>,
    parsed: BTreeMap<String, Policy>,
    /// For the metrics: where each document came from, and why each rejection happened.
    sources: BTreeMap<String, Source>,
    reasons: Vec<(Source, RejectReason)>,
}

/// A [`Change`] whose document was parsed and validated (before the writer lock was taken).
#[derive(Debug, Clone)]
pub(super) enum Prepared {
    Upsert {
        name: String,
        text: String,
        source: Source,
        /// Whether an applied text may override a file's document.
        force: bool,
        /// Boxed: a policy is large and most batches are a single change anyway.
        policy: Box<Result<Policy, PolicyError>>,
    },
    Remove {
        name: String,
    },
}

impl Prepared {
    pub(super) fn parse(change: Change) -> Self {
        match change {
            Change::Upsert {
                name,
                text,
                source,
                force,
            } => {
                let policy = Box::new(load_policy(&name, &text));
                Self::Upsert {
                    name,
                    text,
                    source,
                    force,
                    policy,
                }
            }
            Change::Remove { name } => Self::Remove { name },
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

/// Why a changed document leaves some workload without a policy its proxies can take.
pub(super) struct Unmergeable {
    /// The metrics' label.
    pub(super) reason: RejectReason,
    /// What to tell, naming the document (and the other one of a conflict).
    pub(super) message: String,
}

/// Checks every workload the changed document `name` touches (before or after) still merges
/// and validates; the error names both documents of a conflict.
pub(super) fn check_merges(
    name: &str,
    old: Option<&Policy>,
    parsed: &BTreeMap<String, Policy>,
    max_push: usize,
) -> Result<(), Unmergeable> {
    // `None` when `name` is being removed: then only what remains is checked.
    let new = parsed.get(name);
    let touches_all = [new, old]
        .into_iter()
        .flatten()
        .any(|p| merge::tier(p, DEFAULTS).is_some());
    let workloads: BTreeSet<String> = if touches_all {
        let mut all = named_workloads(parsed);
        all.insert(DEFAULTS.to_string());
        all
    } else {
        [new, old]
            .into_iter()
            .flatten()
            .filter_map(|p| p.workload.as_ref())
            .flat_map(|s| s.names().iter().cloned())
            .collect()
    };
    for workload in workloads {
        match merged_yaml(&workload, parsed) {
            Ok((yaml, _)) => {
                // The version's digits are not known yet: count the longest a u64 can have.
                let line = encode(u64::MAX, yaml, true, Vec::new()).line.len();
                if line > max_push {
                    return Err(Unmergeable {
                        reason: RejectReason::TooLarge,
                        message: format!(
                            "{name}: the merged policy for workload `{workload}` would be pushed as {line} bytes, more than the {max_push} a proxy accepts; split the workload's policy or remove documents it merges"
                        ),
                    });
                }
            }
            // A conflict between two other documents predates this change (it can only arise
            // from a removal); it is not this document's to answer for.
            Err(MergeFailure::Conflict(c)) if !c.involves(name) => {}
            Err(e) => {
                let reason = match e {
                    MergeFailure::Conflict(_) => RejectReason::Conflict,
                    MergeFailure::Invalid { .. } | MergeFailure::Encode(_) => {
                        RejectReason::MergedInvalid
                    }
                };
                return Err(Unmergeable {
                    reason,
                    message: format!("{name}: {e}"),
                });
            }
        }
    }
    Ok(())
}

/// The rejection of `name`, whose `text` does not load.
fn rejected_invalid(name: &str, text: &str, error: &PolicyError, source: Source) -> Rejected {
    Rejected {
        document: name.to_string(),
        message: error.to_string(),
        rendered: crate::diagnose::render(error, text),
        diagnostics: error
            .diagnostics
            .iter()
            .map(|d| ApiDiagnostic {
                path: d.path.clone(),
                message: d.message.clone(),
                line: d.position.map(|p| p.line),
                column: d.position.map(|p| p.column),
            })
            .collect(),
        at_ms: now_ms(),
        from_file: source == Source::File,
    }
}

/// The rejection of `name`, which loads alone but not merged: `message` is its one diagnostic.
pub(super) fn rejected_unmergeable(name: &str, message: String, from_file: bool) -> Rejected {
    Rejected {
        document: name.to_string(),
        rendered: format!("error: {message}\n  --> {name}\n"),
        diagnostics: vec![ApiDiagnostic {
            path: String::new(),
            message: message.clone(),
            line: None,
            column: None,
        }],
        message,
        at_ms: now_ms(),
        from_file,
    }
}

/// Warnings for the Gateway API routes of the `accepted` documents whose parent Services no
/// document of `parsed` has: accepted, as Kubernetes accepts such a route (and reports it not
/// attached), but they route nothing until a policy defines one of those services.
fn unparented_routes(accepted: &[String], parsed: &BTreeMap<String, Policy>) -> Vec<String> {
    accepted
        .iter()
        .filter_map(|name| parsed.get(name).map(|policy| (name, policy)))
        .flat_map(|(name, policy)| policy.gateway.iter().map(move |routes| (name, routes)))
        .filter(|(_, routes)| {
            !routes
                .parents
                .iter()
                .any(|parent| parsed.values().any(|p| p.services.contains_key(parent)))
        })
        .map(|(name, routes)| {
            format!(
                "{name}: {} routes nothing yet: no policy has a service named {} (its \
                 parentRefs); it applies to the workloads whose policy has one",
                routes.title(),
                routes
                    .parents
                    .iter()
                    .map(|p| format!("`{p}`"))
                    .collect::<Vec<_>>()
                    .join(" or ")
            )
        })
        .collect()
}
