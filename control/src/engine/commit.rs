//! The commit of a planned change: the new version written to the store (durable before
//! anyone sees it), made the view, and pushed to the workloads whose merged policy changed.

use std::collections::BTreeMap;

use super::apply::{check_deadline, Batch};
use super::plan::Plan;
use super::publish::republish;
use super::{Engine, EngineError, Outcome};
use crate::api::now_ms;
use crate::metrics::ApplyResult;
use crate::store::{Commit, Source, VersionRecord};

impl Engine {
    /// Writes `plan` as a new version (or, when it accepts nothing, its rejections alone as
    /// the head), makes it the view and pushes the workloads whose merged policy changed.
    /// `plan` is `batch`'s changes validated; nothing is written once its deadline has passed.
    pub(super) fn commit(&self, plan: Plan, batch: &Batch<'_>) -> Result<Outcome, EngineError> {
        let Batch {
            cause,
            deadline,
            made,
            ..
        } = *batch;
        let files = batch.files.clone();
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
