//! How the store takes writes. A change is in force only once written, so a failing store
//! holds every change back: `status`, `/ready` and `/metrics` say so, and the policy
//! directory's changes it could not take stay pending until a later write succeeds.

use super::Engine;
use crate::api::{now_ms, StoreStatus};
use crate::store::StoreError;

/// How writes of the state directory fare.
#[derive(Debug, Default)]
pub(super) struct StoreHealth {
    /// Since the first of the writes failing now; `None` once a write succeeded.
    failing: Option<Failing>,
    /// Failed writes since start.
    write_failures: u64,
    /// The cause of policy-file changes not yet written: the watcher retries them until a
    /// write succeeds, so they are not lost until the next directory event.
    pending: Option<String>,
}

/// The writes failing now.
#[derive(Debug)]
struct Failing {
    /// The last write's error.
    error: String,
    /// When writes began to fail (ms since the Unix epoch).
    since_ms: u64,
}

impl StoreHealth {
    /// Notes a write that succeeded; true when writes were failing until now.
    pub(super) fn recovered(&mut self) -> bool {
        self.failing.take().is_some()
    }

    /// Notes a write that failed with `error`; `pending`: the cause of the policy-file
    /// changes it held back, recorded in the same step so status never shows the one
    /// without the other.
    pub(super) fn failed(&mut self, error: &StoreError, pending: Option<&str>) {
        self.write_failures = self.write_failures.saturating_add(1);
        let since_ms = self.failing.as_ref().map_or_else(now_ms, |f| f.since_ms);
        self.failing = Some(Failing {
            error: error.to_string(),
            since_ms,
        });
        if let Some(cause) = pending {
            self.pending = Some(cause.to_string());
        }
    }

    /// The policy directory's changes were written, or there is none to write.
    pub(super) fn files_written(&mut self) {
        self.pending = None;
    }

    /// The API's view, `place` being where the store is.
    pub(super) fn status(&self, place: &str) -> StoreStatus {
        StoreStatus {
            dir: place.to_string(),
            healthy: self.failing.is_none(),
            error: self.failing.as_ref().map(|f| f.error.clone()),
            failing_since_ms: self.failing.as_ref().map(|f| f.since_ms),
            write_failures: self.write_failures,
            pending: self.pending.clone(),
        }
    }
}

impl Engine {
    /// Whether policy-file changes wait for the state directory to take them (the watcher
    /// retries them).
    pub fn file_changes_pending(&self) -> bool {
        self.lock().store_health.pending.is_some()
    }

    /// How writes of the state directory fare.
    pub fn store_status(&self) -> StoreStatus {
        self.lock().store_health.status(&self.store.describe())
    }
}
