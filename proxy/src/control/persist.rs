//! The last good control-plane policy, kept in `--state-dir` so that a proxy restarted while
//! the control plane is down still starts with it. Written atomically (temporary file, fsync,
//! rename, fsync of the directory): a crash mid-write leaves the previous file whole.
//!
//! A write that fails (a full or read-only volume) is not just logged: the [`Persister`] keeps
//! the newest policy and rewrites it with a capped backoff until a write succeeds, and until
//! then `/ready` says `persisted=false` with the error and `outrider_policy_persist_failures_total`
//! counts the failures, because a restart in the meantime would serve the older file.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use prometheus::{IntCounter, IntGauge};
use serde::{Deserialize, Serialize};

use crate::http::shared::PersistHealth;
use crate::policy::backoff::ceiling;
use crate::telemetry::metrics::{Metrics, MetricsError};

/// File name inside the state directory.
pub const FILE_NAME: &str = "policy.json";

/// What is persisted: the policy text exactly as the control plane sent it, with its version.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Persisted {
    /// The workload it was merged for; another workload's file is ignored.
    pub workload: String,
    /// Control-plane version.
    pub version: u64,
    /// Hex SHA-256 of `policy`.
    pub content_hash: String,
    /// The policy YAML.
    pub policy: String,
}

/// Reading or writing the state failed.
#[derive(Debug, thiserror::Error)]
pub enum PersistError {
    /// A file operation failed.
    #[error("{path}: {source}")]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// The file is not what this proxy writes.
    #[error("{path}: not a persisted policy: {source}")]
    Format {
        /// The file.
        path: PathBuf,
        /// The decoding error.
        source: serde_json::Error,
    },
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> PersistError + '_ {
    move |source| PersistError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Writes `state` to `dir/policy.json` atomically. Blocking: call it off the runtime's
/// threads (`spawn_blocking`).
pub fn save(dir: &Path, state: &Persisted) -> Result<(), PersistError> {
    std::fs::create_dir_all(dir).map_err(io(dir))?;
    let path = dir.join(FILE_NAME);
    let tmp = dir.join(format!("{FILE_NAME}.tmp"));
    let bytes = serde_json::to_vec(state).map_err(|source| PersistError::Format {
        path: path.clone(),
        source,
    })?;
    let mut file = std::fs::File::create(&tmp).map_err(io(&tmp))?;
    file.write_all(&bytes).map_err(io(&tmp))?;
    file.sync_all().map_err(io(&tmp))?;
    drop(file);
    std::fs::rename(&tmp, &path).map_err(io(&path))?;
    // The rename is durable only once the directory entry is.
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io(dir))?;
    Ok(())
}

/// First wait before rewriting a policy whose write failed; doubles per failure.
pub const RETRY_BASE: Duration = Duration::from_millis(250);
/// Longest wait between rewrites: a repaired volume gets the file within this.
pub const RETRY_MAX: Duration = Duration::from_secs(10);

/// The newest policy to persist and whether the file holds it.
#[derive(Debug, Default)]
struct Latest {
    state: Option<Arc<Persisted>>,
    written: bool,
}

/// Keeps `dir/policy.json` holding the newest applied control-plane policy: see the module
/// documentation. Share it as `Arc<Persister>`; run [`Persister::retry`] once.
#[derive(Debug)]
pub struct Persister {
    dir: PathBuf,
    /// Held across each write, so writes are serialized and always write the newest policy:
    /// a retry never puts back an older version over a newer one.
    latest: Mutex<Latest>,
    /// Wakes [`Self::retry`] after a failed write.
    failed: tokio::sync::Notify,
    health: Arc<PersistHealth>,
    failures: IntCounter,
    persisted_version: IntGauge,
}

impl Persister {
    /// A persister writing into `dir`, reporting to `health` and to two metrics registered
    /// in `metrics`; `on_disk` is the version the file holds at start, if any.
    pub fn new(
        dir: PathBuf,
        health: Arc<PersistHealth>,
        metrics: &Metrics,
        on_disk: Option<u64>,
    ) -> Result<Self, MetricsError> {
        let failures = IntCounter::new(
            "outrider_policy_persist_failures_total",
            "Failed writes of the last good control-plane policy to --state-dir (each retried).",
        )?;
        let persisted_version = IntGauge::new(
            "outrider_policy_persisted_version",
            "Version of the control-plane policy --state-dir holds (0: none).",
        )?;
        metrics.register(Box::new(failures.clone()))?;
        metrics.register(Box::new(persisted_version.clone()))?;
        persisted_version.set(gauge_value(on_disk.unwrap_or(0)));
        Ok(Self {
            dir,
            latest: Mutex::new(Latest::default()),
            failed: tokio::sync::Notify::new(),
            health,
            failures,
            persisted_version,
        })
    }

    fn lock(&self) -> MutexGuard<'_, Latest> {
        self.latest.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Makes `state` the policy to persist and writes it (off the runtime's threads); a failed
    /// write is logged, shown in `/ready` and the metrics, and rewritten by [`Self::retry`].
    pub async fn persist(self: &Arc<Self>, state: Persisted) {
        *self.lock() = Latest {
            state: Some(Arc::new(state)),
            written: false,
        };
        let this = Arc::clone(self);
        match tokio::task::spawn_blocking(move || this.write_latest()).await {
            Ok(Ok(())) => {}
            Ok(Err(error)) => {
                tracing::warn!(%error, "cannot persist the policy; retrying until it is written");
                self.failed.notify_one();
            }
            Err(error) => {
                tracing::warn!(%error, "cannot persist the policy; retrying until it is written");
                self.failed.notify_one();
            }
        }
    }

    /// Writes the newest policy unless the file holds it already. Blocking.
    fn write_latest(&self) -> Result<(), PersistError> {
        let mut latest = self.lock();
        let state = match &latest.state {
            Some(state) if !latest.written => Arc::clone(state),
            _ => return Ok(()),
        };
        match save(&self.dir, &state) {
            Ok(()) => {
                latest.written = true;
                self.persisted_version.set(gauge_value(state.version));
                self.health.set(None);
                Ok(())
            }
            Err(error) => {
                self.failures.inc();
                self.health.set(Some(error.to_string()));
                Err(error)
            }
        }
    }

    /// Rewrites a policy whose write failed, [`RETRY_BASE`] after the failure and doubling up
    /// to [`RETRY_MAX`], until a write succeeds; then waits for the next failure. Runs forever.
    pub async fn retry(self: Arc<Self>) {
        loop {
            self.failed.notified().await;
            let mut attempt = 0u32;
            loop {
                tokio::time::sleep(ceiling(RETRY_BASE, RETRY_MAX, attempt)).await;
                attempt = attempt.saturating_add(1);
                let this = Arc::clone(&self);
                match tokio::task::spawn_blocking(move || this.write_latest()).await {
                    Ok(Ok(())) => break,
                    Ok(Err(error)) => {
                        tracing::warn!(%error, attempt, "still cannot persist the policy")
                    }
                    Err(error) => {
                        tracing::warn!(%error, attempt, "still cannot persist the policy")
                    }
                }
            }
            tracing::info!(attempt, "policy persisted after failed writes");
        }
    }
}

fn gauge_value(version: u64) -> i64 {
    i64::try_from(version).unwrap_or(i64::MAX)
}

/// Reads `dir/policy.json`; `Ok(None)` when there is none.
pub fn load(dir: &Path) -> Result<Option<Persisted>, PersistError> {
    let path = dir.join(FILE_NAME);
    let bytes = match std::fs::read(&path) {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(source) => return Err(PersistError::Io { path, source }),
    };
    serde_json::from_slice(&bytes)
        .map(Some)
        .map_err(|source| PersistError::Format { path, source })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn temp_dir(name: &str) -> PathBuf {
        let dir =
            std::env::temp_dir().join(format!("outrider-persist-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        dir
    }

    #[test]
    fn round_trips_and_replaces_whole() {
        let dir = temp_dir("round");
        assert_eq!(load(&dir).unwrap(), None);
        let first = Persisted {
            workload: "checkout".into(),
            version: 3,
            content_hash: "abc".into(),
            policy: "services: {}\n".into(),
        };
        save(&dir, &first).unwrap();
        assert_eq!(load(&dir).unwrap(), Some(first));
        let second = Persisted {
            workload: "checkout".into(),
            version: 4,
            content_hash: "def".into(),
            policy: "routes: []\n".into(),
        };
        save(&dir, &second).unwrap();
        assert_eq!(load(&dir).unwrap(), Some(second));
        // No temporary file is left behind.
        let names: Vec<_> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, [FILE_NAME]);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    fn persisted(version: u64) -> Persisted {
        Persisted {
            workload: "checkout".into(),
            version,
            content_hash: format!("h{version}"),
            policy: format!("# v{version}\n"),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_failed_write_shows_and_is_retried_until_the_newest_policy_is_on_disk() {
        let dir = temp_dir("retry");
        // A file where the directory should be: every write fails (ENOTDIR/EEXIST).
        std::fs::write(&dir, b"").unwrap();
        let metrics = Metrics::new("checkout").unwrap();
        let health = Arc::new(PersistHealth::default());
        let persister =
            Arc::new(Persister::new(dir.clone(), Arc::clone(&health), &metrics, Some(1)).unwrap());
        let retry = tokio::spawn(Arc::clone(&persister).retry());
        let failures = || persister.failures.get();
        persister.persist(persisted(2)).await;
        assert_eq!(failures(), 1);
        assert!(health
            .error()
            .is_some_and(|e| e.contains(&dir.display().to_string())));
        assert_eq!(persister.persisted_version.get(), 1);
        // Retried after 250 ms, then 500 ms: still failing, still shown.
        tokio::time::sleep(RETRY_BASE + RETRY_BASE * 2 + Duration::from_millis(10)).await;
        assert_eq!(failures(), 3);
        // A newer policy arrives while failing: the retries write it, not the older one.
        persister.persist(persisted(3)).await;
        assert_eq!(failures(), 4);
        std::fs::remove_file(&dir).unwrap();
        tokio::time::sleep(RETRY_MAX + Duration::from_millis(10)).await;
        assert_eq!(load(&dir).unwrap(), Some(persisted(3)));
        assert_eq!(health.error(), None);
        assert_eq!(persister.persisted_version.get(), 3);
        let settled = failures();
        tokio::time::sleep(RETRY_MAX * 3).await;
        assert_eq!(failures(), settled, "nothing left to retry");
        retry.abort();
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_corrupt_file_is_an_error_not_a_policy() {
        let dir = temp_dir("corrupt");
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join(FILE_NAME), b"{\"version\": 1").unwrap();
        assert!(matches!(load(&dir), Err(PersistError::Format { .. })));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
