//! The policy directory: a scan's changed and deleted files become changes, imported by the
//! leader; a file overridden by an applied document waits until `delete` hands it back.

use std::collections::{BTreeMap, BTreeSet};

use outrider_config::{Policy, PolicyError};

use super::apply::{Batch, Made};
use super::commit::FileSync;
use super::persist::Committer;
use super::plan::Prepared;
use super::{load_policy, Engine, EngineError, Outcome};
use crate::rejections::Rejections;
use crate::store::Source;

/// A file of the policy directory as read by a scan.
#[derive(Debug, Clone)]
pub struct ScannedFile {
    /// Its content.
    pub text: String,
    /// Its modification time, to order changes (the later-changed document loses a conflict).
    pub modified: std::time::SystemTime,
}

impl Engine {
    /// Brings the documents from files in line with a scan of the policy directory: changed
    /// files (oldest modification first) are upserted, deleted files removed. `unreadable`
    /// files are left as they are. Changes the state directory could not take are recorded as
    /// pending ([`Self::file_changes_pending`]) until a later sync writes or drops them.
    pub fn sync_files(
        &self,
        scan: BTreeMap<String, ScannedFile>,
        unreadable: &BTreeSet<String>,
    ) -> Result<Option<Outcome>, EngineError> {
        let result = self.sync_files_uncounted(scan, unreadable);
        self.count_refusal(Source::File, result)
    }

    fn sync_files_uncounted(
        &self,
        scan: BTreeMap<String, ScannedFile>,
        unreadable: &BTreeSet<String>,
    ) -> Result<Option<Outcome>, EngineError> {
        // Parsed before the writer lock, like an applied document; a file that changed again
        // since (another scan got the lock first) is parsed under it.
        let mut ahead: BTreeMap<String, Result<Policy, PolicyError>> = {
            let seen = self.lock().state.seen_files.clone();
            scan.iter()
                .filter(|(name, file)| {
                    seen.get(*name) != Some(&outrider_config::content_hash(&file.text))
                })
                .map(|(name, file)| (name.clone(), load_policy(name, &file.text)))
                .collect()
        };
        let _writer = self.lock_writer();
        let mut inner = self.lock();
        // A rejected file that was deleted is no longer anyone's problem (committed with the
        // version below, or alone when there is none).
        let gone_rejection = |rejections: &mut Rejections| {
            let before = rejections.len();
            rejections.retain(|name, r| !r.from_file || scan.contains_key(name));
            rejections.len() != before
        };
        let pruned = inner
            .state
            .rejections
            .iter()
            .any(|(name, r)| r.from_file && !scan.contains_key(name));
        // A file whose document was applied over it (or applied before the file appeared)
        // stays out of force: the applied text wins until `delete` hands it back.
        let shadowed: BTreeMap<String, String> = scan
            .iter()
            .filter(|(name, _)| {
                inner
                    .docs
                    .get(*name)
                    .is_some_and(|d| d.source == Source::Api)
            })
            .map(|(name, file)| (name.clone(), file.text.clone()))
            .collect();
        for (name, text) in &shadowed {
            if inner.shadowed.get(name) != Some(text) {
                tracing::warn!(document = %name, "policy file overridden by an applied document; its change is not in force (`outriderctl delete {name}` hands the document back to the file)");
            }
        }
        let kept: BTreeMap<String, String> = inner
            .shadowed
            .iter()
            .filter(|(name, _)| unreadable.contains(*name) && !shadowed.contains_key(*name))
            .map(|(n, t)| (n.clone(), t.clone()))
            .collect();
        inner.shadowed = shadowed;
        inner.shadowed.extend(kept);
        let mut upserts: Vec<(&String, &ScannedFile, String)> = scan
            .iter()
            .filter(|(name, _)| !inner.shadowed.contains_key(*name))
            .map(|(name, file)| (name, file, outrider_config::content_hash(&file.text)))
            .filter(|(name, _, hash)| inner.state.seen_files.get(*name) != Some(hash))
            .collect();
        upserts.sort_by(|a, b| (a.1.modified, a.0).cmp(&(b.1.modified, b.0)));
        let mut seen = inner.state.seen_files.clone();
        // Removals first: a file deleted in the same burst cannot conflict with the others.
        let mut changes = Vec::new();
        let gone: BTreeSet<String> = inner
            .state
            .seen_files
            .keys()
            .chain(
                inner
                    .docs
                    .iter()
                    .filter(|(_, d)| d.source == Source::File)
                    .map(|(n, _)| n),
            )
            .filter(|n| !scan.contains_key(*n) && !unreadable.contains(*n))
            .cloned()
            .collect();
        for name in gone {
            seen.remove(&name);
            if inner
                .docs
                .get(&name)
                .is_some_and(|d| d.source == Source::File)
            {
                changes.push(Prepared::Remove { name });
            }
        }
        changes.extend(upserts.iter().map(|(name, file, _)| {
            let policy = ahead
                .remove(*name)
                .unwrap_or_else(|| load_policy(name, &file.text));
            let policy = Box::new(policy);
            Prepared::Upsert {
                name: (*name).clone(),
                text: file.text.clone(),
                source: Source::File,
                force: false,
                policy,
            }
        }));
        if changes.is_empty() {
            inner.state.seen_files = seen;
            inner.store_health.files_written();
            drop(inner);
            if pruned {
                self.commit_rejections(Committer::Leader, gone_rejection)?;
            }
            return Ok(None);
        }
        let names: Vec<&str> = changes
            .iter()
            .map(|c| match c {
                Prepared::Upsert { name, .. } | Prepared::Remove { name } => name.as_str(),
            })
            .collect();
        let cause = format!("files changed: {}", names.join(", "));
        let files = FileSync {
            seen,
            upserted: upserts
                .iter()
                .map(|(name, _, hash)| ((*name).clone(), hash.clone()))
                .collect(),
        };
        if pruned {
            gone_rejection(&mut inner.state.rejections);
        }
        drop(inner);
        self.apply_serialized(Batch {
            files: Some(files),
            ..Batch::commit(changes, &cause, Made::import())
        })
        .map(|outcome| {
            for warning in &outcome.warnings {
                tracing::warn!("policy directory: {warning}");
            }
            Some(outcome)
        })
    }
}
