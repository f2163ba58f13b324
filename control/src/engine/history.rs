//! The kept versions: listing them, and rolling back to one as a new version.

use std::collections::BTreeMap;

use super::persist::Committer;
use super::publish::republish;
use super::{Engine, EngineError, Outcome, MAX_CONFLICTS};
use crate::api::{now_ms, HistoryEntry};
use crate::metrics::VersionCause;
use crate::store::{Commit, Source, VersionRecord};

impl Engine {
    /// The kept versions, newest first.
    pub fn history(&self) -> Vec<HistoryEntry> {
        let inner = self.lock();
        inner
            .state
            .history
            .iter()
            .rev()
            .map(|r| HistoryEntry {
                version: r.version,
                at_ms: r.at_ms,
                cause: r.cause.clone(),
                documents: (r.documents.iter())
                    .map(|(name, doc)| {
                        let current = inner.docs.get(name).map(|d| d.text.as_str());
                        let current = current.zip(inner.parsed.get(name));
                        crate::gateway::describe_version(name, &doc.text, current)
                    })
                    .collect(),
            })
            .collect()
    }

    /// Makes a kept version's documents the ones in force again, as a new version.
    pub fn rollback(&self, to: u64) -> Result<Outcome, EngineError> {
        let result = self.rollback_uncounted(to);
        self.count_refusal(Source::Api, result)
    }

    fn rollback_uncounted(&self, to: u64) -> Result<Outcome, EngineError> {
        let _writer = self.lock_writer();
        self.check_writable()?;
        for _ in 0..MAX_CONFLICTS {
            match self.rollback_once(to) {
                Err(EngineError::Conflict) => self.reload()?,
                other => return other,
            }
        }
        Err(EngineError::Contended)
    }

    fn rollback_once(&self, to: u64) -> Result<Outcome, EngineError> {
        let (record, mut state, current) = {
            let inner = self.lock();
            let record = inner
                .state
                .history
                .iter()
                .find(|r| r.version == to)
                .cloned()
                .ok_or(EngineError::NotKept(to))?;
            (record, inner.state.clone(), inner.docs.clone())
        };
        let version = state.version + 1;
        let mut parsed = BTreeMap::new();
        let mut docs = BTreeMap::new();
        for (name, mut doc) in record.documents {
            let loaded = outrider_config::load_document(&name, &doc.text).map_err(|error| {
                EngineError::Stored {
                    name: name.clone(),
                    error,
                }
            })?;
            parsed.insert(name.clone(), loaded.policy);
            if current.get(&name).map(|d| &d.text) != Some(&doc.text) {
                doc.changed_at = version;
            }
            docs.insert(name, doc);
        }
        let cause = format!("rollback to {to}");
        state.push(VersionRecord {
            version,
            at_ms: now_ms(),
            cause: cause.clone(),
            documents: docs.clone(),
        });
        state.revision = self.save(&state, None, Committer::AnyReplica, Commit::Version)?;
        let mut inner = self.lock();
        inner.state = state;
        inner.docs = docs;
        inner.parsed = parsed;
        inner.committed(version);
        let workloads = republish(&mut inner, version);
        drop(inner);
        self.metrics.version(VersionCause::Rollback);
        tracing::info!(version, to, "rolled back");
        Ok(Outcome {
            version,
            workloads,
            ..Outcome::default()
        })
    }
}
