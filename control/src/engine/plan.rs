//! The plan of a change: its documents checked against what is in force and merged per
//! workload ([`Engine::plan`]), changing nothing; a dry run shows it ([`Engine::preview`]),
//! a commit writes it ([`commit`](super::commit)).

use std::collections::{BTreeMap, BTreeSet};

use outrider_config::{Policy, PolicyError};

use super::publish::{encode, identity, merged_yaml, named_workloads, remerge, MergeFailure};
use super::{load_policy, Change, Engine, Outcome, DEFAULTS};
use crate::api::{now_ms, ApiDiagnostic, Rejected};
use crate::merge;
use crate::metrics::RejectReason;
use crate::store::{Source, StoredDoc};

impl Engine {
    /// Validates `changes` against the view, in order: each document alone, then every
    /// workload it merges into. Changes nothing; the caller holds the writer lock, so the view
    /// stays what the plan was made on.
    pub(super) fn plan(&self, changes: Vec<Prepared>) -> Plan {
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
    pub(super) fn preview(&self, plan: Plan) -> Outcome {
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
}

/// A batch of changes validated against the view, not yet committed.
pub(super) struct Plan {
    /// The version committing it makes.
    pub(super) version: u64,
    /// Accepted, unchanged and rejected documents, and the diffs (its version and workloads
    /// are filled in by the commit or the preview).
    pub(super) outcome: Outcome,
    /// The documents in force once committed, and their parsed policies.
    pub(super) docs: BTreeMap<String, StoredDoc>,
    pub(super) parsed: BTreeMap<String, Policy>,
    /// For the metrics: where each document came from, and why each rejection happened.
    pub(super) sources: BTreeMap<String, Source>,
    pub(super) reasons: Vec<(Source, RejectReason)>,
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
