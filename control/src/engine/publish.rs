//! Publication: each workload's merged policy, encoded once into the update line its
//! subscriptions push, and re-merged whenever the documents in force change.
//!
//! A workload's channel is a [`watch`] whose value is the pre-encoded line, so an accepted
//! change costs one merge and one encode per workload whatever the number of proxies.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use bytes::Bytes;
use outrider_config::wire::{PolicyUpdate, ServerMessage};
use outrider_config::{Policy, PolicyError};
use tokio::sync::watch;

use super::{Engine, Inner, DEFAULTS};
use crate::api::{WorkloadPolicy, WorkloadVersion};
use crate::merge;

/// A workload's merged policy as pushed.
#[derive(Debug)]
pub struct Published {
    /// Version it was merged at.
    pub version: u64,
    /// Hash of `policy`.
    pub content_hash: String,
    /// The merged YAML.
    pub policy: String,
    /// No document names the workload: it receives only the defaults (told to its proxies,
    /// which say so in `/ready` and their logs).
    pub unselected: bool,
    /// The [`ServerMessage::Update`] line (JSON and `\n`), encoded once for every subscriber.
    pub line: Bytes,
    /// The services of the policy with `discovery: registry`, whose registered endpoints
    /// the workload's subscribers are pushed ([`crate::discovery`]).
    pub registry_services: Vec<String>,
}

impl Engine {
    /// The channel carrying `workload`'s merged policy, created on first use (a workload no
    /// document names gets the defaults).
    pub fn subscribe(&self, workload: &str) -> watch::Receiver<Arc<Published>> {
        let mut inner = self.lock();
        if let Some(sender) = inner.published.get(workload) {
            return sender.subscribe();
        }
        // Every workload some document names is published already; any other one receives
        // the defaults, exactly as published for "*" (same version, same hash).
        if let Some(defaults) = inner.published.get(DEFAULTS) {
            let (sender, receiver) = watch::channel(Arc::clone(&defaults.borrow()));
            inner.published.insert(workload.to_string(), sender);
            return receiver;
        }
        let version = inner.state.version;
        let named = named_workloads(&inner.parsed);
        let published = publication(workload, &inner.parsed, &named, version).unwrap_or_else(|e| {
            // Cannot happen for a workload no document names (it gets the validated
            // defaults); logged and served empty rather than refusing the proxy.
            tracing::error!(workload, error = %e, "merged policy invalid");
            encode(
                version,
                String::new(),
                !named.contains(workload),
                Vec::new(),
            )
        });
        let (sender, receiver) = watch::channel(Arc::new(published));
        inner.published.insert(workload.to_string(), sender);
        receiver
    }

    /// `workload`'s merged policy in force, and whether a document names it and a connected
    /// proxy runs it (neither: a typo, most likely).
    pub fn policy(&self, workload: &str) -> WorkloadPolicy {
        let receiver = self.subscribe(workload);
        let (named, running) = {
            let inner = self.lock();
            let named = workload == DEFAULTS || named_workloads(&inner.parsed).contains(workload);
            let running = inner
                .proxies
                .iter()
                .any(|(_, p)| p.connected && p.workload == workload);
            (named, running)
        };
        let published = receiver.borrow();
        WorkloadPolicy {
            workload: workload.to_string(),
            version: published.version,
            content_hash: published.content_hash.clone(),
            policy: published.policy.clone(),
            named,
            running,
        }
    }
}

/// Re-merges every known workload and pushes those whose merged policy changed.
pub(super) fn republish(inner: &mut Inner, version: u64) -> Vec<WorkloadVersion> {
    let mut changed = Vec::new();
    for (workload, published) in remerge(&inner.published, &inner.parsed, version) {
        changed.push(identity(&workload, &published));
        match inner.published.get(&workload) {
            Some(sender) => {
                sender.send_replace(Arc::new(published));
            }
            None => {
                let (sender, _) = watch::channel(Arc::new(published));
                inner.published.insert(workload, sender);
            }
        }
    }
    changed
}

/// Every known workload whose merged policy under `parsed` differs from what is published.
pub(super) fn remerge(
    published: &BTreeMap<String, watch::Sender<Arc<Published>>>,
    parsed: &BTreeMap<String, Policy>,
    version: u64,
) -> Vec<(String, Published)> {
    let named = named_workloads(parsed);
    let mut workloads = named.clone();
    workloads.insert(DEFAULTS.to_string());
    workloads.extend(published.keys().cloned());
    let mut changed = Vec::new();
    for workload in workloads {
        let merged = match publication(&workload, parsed, &named, version) {
            Ok(p) => p,
            Err(e) => {
                // Only reachable through a removal; the workload keeps what it has.
                tracing::error!(workload, error = %e, "merged policy invalid; workload keeps its previous policy");
                continue;
            }
        };
        // A workload newly named (or no longer) by a document its proxies are told, even
        // when its merged policy stays the same.
        let same = published.get(&workload).is_some_and(|s| {
            let current = s.borrow();
            current.content_hash == merged.content_hash && current.unselected == merged.unselected
        });
        if !same {
            changed.push((workload, merged));
        }
    }
    changed
}

/// After a restart, gives each workload the version at which its merged policy last changed
/// (as it had before the restart) rather than the latest version: walking the kept history
/// back while the workload's merged policy stays the same.
pub(super) fn settle_versions(inner: &mut Inner) {
    let older: Vec<(u64, Option<BTreeMap<String, Policy>>)> = inner
        .state
        .history
        .iter()
        .rev()
        .skip(1)
        .map(|record| {
            let parsed = record
                .documents
                .iter()
                .map(|(name, doc)| {
                    outrider_config::load_document(name, &doc.text)
                        .map(|l| (name.clone(), l.policy))
                })
                .collect::<Result<BTreeMap<_, _>, _>>()
                .ok();
            (record.version, parsed)
        })
        .collect();
    for (workload, sender) in &inner.published {
        let current = Arc::clone(&sender.borrow());
        let mut version = current.version;
        for (record_version, parsed) in &older {
            let same = parsed.as_ref().is_some_and(|parsed| {
                merged_yaml(workload, parsed).is_ok_and(|(yaml, _)| yaml == current.policy)
            });
            if !same {
                break;
            }
            version = *record_version;
        }
        if version != current.version {
            sender.send_replace(Arc::new(encode(
                version,
                current.policy.clone(),
                current.unselected,
                current.registry_services.clone(),
            )));
        }
    }
}

/// `named`: the workloads some document names ([`named_workloads`] of `parsed`).
fn publication(
    workload: &str,
    parsed: &BTreeMap<String, Policy>,
    named: &BTreeSet<String>,
    version: u64,
) -> Result<Published, MergeFailure> {
    merged_yaml(workload, parsed)
        .map(|(yaml, registry)| encode(version, yaml, !named.contains(workload), registry))
}

/// The merged policy's YAML, and its services with `discovery: registry`.
pub(super) fn merged_yaml(
    workload: &str,
    parsed: &BTreeMap<String, Policy>,
) -> Result<(String, Vec<String>), MergeFailure> {
    let policy = merge::merge(workload, parsed.iter().map(|(n, p)| (n.as_str(), p)))
        .map_err(MergeFailure::Conflict)?;
    let yaml = outrider_config::to_yaml(&policy).map_err(MergeFailure::Encode)?;
    let registry = policy
        .services
        .iter()
        .filter(|(_, s)| s.discovery == Some(outrider_config::Discovery::Registry))
        .map(|(name, _)| name.clone())
        .collect();
    // Validated exactly as the proxy will load it.
    outrider_config::load(&format!("merged policy for {workload}"), &yaml).map_err(|error| {
        MergeFailure::Invalid {
            workload: workload.to_string(),
            error,
        }
    })?;
    Ok((yaml, registry))
}

/// Why a workload's documents do not make a policy its proxies can load.
#[derive(Debug, thiserror::Error)]
pub(super) enum MergeFailure {
    #[error("{0}")]
    Conflict(Box<merge::Conflict>),
    #[error("the merged policy for workload `{workload}` is invalid: {error}")]
    Invalid {
        workload: String,
        error: PolicyError,
    },
    #[error("cannot encode the merged policy: {0}")]
    Encode(outrider_config::EncodeError),
}

/// `policy` as pushed at `version`: hashed, and encoded into its update line.
pub(super) fn encode(
    version: u64,
    policy: String,
    unselected: bool,
    registry_services: Vec<String>,
) -> Published {
    let content_hash = outrider_config::content_hash(&policy);
    let message = ServerMessage::Update(PolicyUpdate {
        version,
        content_hash: content_hash.clone(),
        policy: policy.clone(),
        unselected,
    });
    let mut line = serde_json::to_vec(&message).unwrap_or_default();
    line.push(b'\n');
    Published {
        version,
        content_hash,
        policy,
        unselected,
        line: Bytes::from(line),
        registry_services,
    }
}

/// The workloads some document of `parsed` names (not `*`).
pub(super) fn named_workloads(parsed: &BTreeMap<String, Policy>) -> BTreeSet<String> {
    parsed
        .values()
        .filter_map(|p| p.workload.as_ref())
        .filter(|s| !s.is_all())
        .flat_map(|s| s.names().iter().cloned())
        .collect()
}

/// Which policy `workload` was published, as the API reports it.
pub(super) fn identity(workload: &str, published: &Published) -> WorkloadVersion {
    WorkloadVersion {
        workload: workload.to_string(),
        version: published.version,
        content_hash: published.content_hash.clone(),
    }
}
