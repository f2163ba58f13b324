//! `delete`: an applied document removed as a new version, or handed back to the policy
//! file it overrode, or (never in force) its rejection cleared.

use std::collections::BTreeMap;
use std::time::Instant;

use super::apply::{check_deadline, Batch, Made};
use super::commit::FileSync;
use super::persist::Committer;
use super::plan::{check_merges, rejected_unmergeable, Prepared, Unmergeable};
use super::{load_policy, Engine, EngineError, Outcome};
use crate::metrics::{ApplyResult, VersionCause};
use crate::store::Source;

impl Engine {
    /// Removes a document added with `apply` as a new version, unless what remains leaves some
    /// workload's merged policy invalid (then it is rejected in the outcome, nothing changes).
    /// Changes nothing once `deadline` has passed, like [`Self::apply_by`].
    pub fn delete(&self, name: &str, deadline: Option<Instant>) -> Result<Outcome, EngineError> {
        let result = self.delete_uncounted(name, deadline);
        self.count_refusal(Source::Api, result)
    }

    fn delete_uncounted(
        &self,
        name: &str,
        deadline: Option<Instant>,
    ) -> Result<Outcome, EngineError> {
        let _writer = self.lock_writer();
        check_deadline(deadline)?;
        let mut parsed = {
            let inner = self.lock();
            if let Some(file_text) = inner.shadowed.get(name).cloned() {
                // The file it overrides takes the document back.
                let hash = outrider_config::content_hash(&file_text);
                let seen = inner.state.seen_files.clone();
                drop(inner);
                let change = Prepared::Upsert {
                    name: name.to_string(),
                    policy: Box::new(load_policy(name, &file_text)),
                    text: file_text,
                    source: Source::File,
                    force: false,
                };
                let files = FileSync {
                    seen,
                    upserted: BTreeMap::from([(name.to_string(), hash)]),
                };
                let cause = format!("delete {name} (back to its file)");
                return self.apply_serialized(Batch {
                    files: Some(files),
                    deadline,
                    ..Batch::commit(vec![change], &cause, Made::by(VersionCause::Delete))
                });
            }
            match inner.docs.get(name) {
                // A rejected text that never was in force: deleting it clears the rejection.
                None if inner
                    .state
                    .rejections
                    .get(name)
                    .is_some_and(|r| !r.from_file) =>
                {
                    drop(inner);
                    self.check_writable()?;
                    self.commit_rejections(Committer::AnyReplica, |rejections| {
                        rejections.clear(name)
                    })?;
                    return Ok(Outcome {
                        version: self.version(),
                        unchanged: vec![name.to_string()],
                        ..Outcome::default()
                    });
                }
                None => return Err(EngineError::UnknownDocument(name.to_string())),
                Some(doc) if doc.source == Source::File => {
                    return Err(EngineError::FileBacked(name.to_string()))
                }
                Some(_) => inner.parsed.clone(),
            }
        };
        // Validated without the data lock, like an upsert; the writer lock keeps it current.
        let old = parsed.remove(name);
        if let Err(Unmergeable { reason, message }) =
            check_merges(name, old.as_ref(), &parsed, self.max_push)
        {
            self.metrics.applied(Source::Api, ApplyResult::Rejected);
            self.metrics.rejected(Source::Api, reason);
            let message = format!("cannot delete {message}");
            return Ok(Outcome {
                version: self.version(),
                rejected: vec![rejected_unmergeable(name, message, false)],
                ..Outcome::default()
            });
        }
        let change = Prepared::Remove {
            name: name.to_string(),
        };
        let cause = format!("delete {name}");
        self.apply_serialized(Batch {
            deadline,
            ..Batch::commit(vec![change], &cause, Made::by(VersionCause::Delete))
        })
    }
}
