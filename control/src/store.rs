//! The control plane's durable state: every accepted version's documents (the last
//! [`HISTORY_LEN`]), the current version number, which file contents were already seen, and
//! the documents rejected since ([`crate::rejections`]).
//!
//! Two backends behind [`Store`]. The state directory (the default, for a single replica):
//! one JSON file, `state.json`, replaced atomically: written to a temporary file, fsynced,
//! renamed over the old one, and the directory fsynced so the rename itself survives a crash.
//! A crash at any point leaves either the old or the new state, never a torn one. Or etcd
//! ([`crate::etcd`]), shared by several replicas: a save there is a compare-and-swap on the
//! revision the state was read at, so two replicas never commit the same version.

use std::collections::{BTreeMap, VecDeque};
use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::rejections::Rejections;

/// Versions kept for `history` and `rollback`.
pub const HISTORY_LEN: usize = 50;
const STATE_FILE: &str = "state.json";
pub(crate) const FORMAT: u32 = 1;

/// Where a document came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Source {
    /// A file in the watched policy directory.
    File,
    /// `outriderctl apply` (`POST /v1/apply`).
    Api,
}

/// One document as accepted.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredDoc {
    /// The YAML text.
    pub text: String,
    /// Where it came from.
    pub source: Source,
    /// The version at which this text was accepted.
    pub changed_at: u64,
}

/// One accepted version: the whole set of documents in force from then on.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VersionRecord {
    /// The version number.
    pub version: u64,
    /// When it was accepted, in milliseconds since the Unix epoch.
    pub at_ms: u64,
    /// What made it (`file checkout.yaml changed`, `apply checkout`, `rollback to 4`).
    pub cause: String,
    /// Every document in force, by name.
    pub documents: BTreeMap<String, StoredDoc>,
}

/// The whole durable state.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct State {
    /// Format of this file, for future migrations.
    pub format: u32,
    /// The last version given out; 0 before the first accepted change.
    pub version: u64,
    /// Content hash of each policy file as last processed, so a restart neither re-applies
    /// unchanged files nor undoes a rollback whose files did not change since.
    pub seen_files: BTreeMap<String, String>,
    /// The kept versions, oldest first; the last one is in force.
    pub history: VecDeque<VersionRecord>,
    /// The documents rejected and not accepted since (absent from a file written before
    /// rejections were kept).
    #[serde(default, skip_serializing_if = "Rejections::is_empty")]
    pub rejections: Rejections,
    /// The store's revision this state was read or written at (etcd's `mod_revision` of the
    /// state key; 0 in a state directory, or before the first write): the next save commits
    /// only if the store is still there.
    #[serde(skip)]
    pub revision: i64,
}

impl State {
    /// The documents in force.
    pub fn current(&self) -> BTreeMap<String, StoredDoc> {
        self.history
            .back()
            .map(|r| r.documents.clone())
            .unwrap_or_default()
    }

    /// Appends a version, forgetting the oldest beyond [`HISTORY_LEN`].
    pub fn push(&mut self, record: VersionRecord) {
        self.version = record.version;
        self.history.push_back(record);
        while self.history.len() > HISTORY_LEN {
            self.history.pop_front();
        }
    }
}

/// Problems reading or writing the state directory.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// A filesystem operation failed.
    #[error("{what} {path}: {source}")]
    Io {
        /// The operation.
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// The state file is not ours or is damaged.
    #[error("{path} is not a valid state file: {source}")]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: serde_json::Error,
    },
    /// Written by a newer version.
    #[error("{path} has format {found}; this build reads format {FORMAT}")]
    Format {
        /// The file.
        path: PathBuf,
        /// The format found.
        found: u32,
    },
    /// Another replica committed a version since this state was read: read it again and
    /// redo the change on top of it.
    #[error("another replica changed the state first")]
    Conflict,
    /// etcd cannot be reached, has no quorum, or did not answer in time.
    #[error("{store} is unavailable: {message}")]
    Unavailable {
        /// The store: `etcd://` and its endpoints.
        store: String,
        /// The client's error.
        message: String,
    },
    /// An import of the policy directory by a replica that no longer leads (its lease was
    /// lost): the new leader imports the directory.
    #[error("this replica no longer leads: the policy directory is imported by the leader")]
    NotLeader,
    /// etcd answered, but with something that is not our state.
    #[error("etcd key {key} is not valid state: {message}")]
    Invalid {
        /// The key.
        key: String,
        /// Why.
        message: String,
    },
}

impl StoreError {
    /// Whether the store could not be reached at all (as opposed to refusing the write).
    pub fn is_unavailable(&self) -> bool {
        matches!(self, Self::Unavailable { .. })
    }
}

/// What a save commits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Commit {
    /// A new version: the head and the newest history record.
    Version,
    /// The head alone (the version is unchanged: rejections or seen files changed).
    Head,
}

/// Where the state lives: a local directory or etcd.
#[derive(Debug, Clone)]
pub struct Store {
    backend: Backend,
    /// Tests stand in for a slow disk with it.
    #[cfg(test)]
    pub(crate) gate: Option<std::sync::Arc<SaveGate>>,
}

/// A test's slow disk: each save says it has started, then waits (at most 10 s) for a go.
#[cfg(test)]
#[derive(Debug)]
pub(crate) struct SaveGate {
    pub(crate) entered: std::sync::mpsc::SyncSender<()>,
    pub(crate) release: std::sync::Mutex<std::sync::mpsc::Receiver<()>>,
}

#[derive(Debug, Clone)]
enum Backend {
    Dir(PathBuf),
    /// Boxed: the etcd clients are several kilobytes.
    Etcd(Box<crate::etcd::EtcdStore>),
}

impl Store {
    /// Opens (creating it if needed) the state directory.
    pub fn open(dir: &Path) -> Result<Self, StoreError> {
        fs::create_dir_all(dir).map_err(|source| StoreError::Io {
            what: "cannot create",
            path: dir.to_path_buf(),
            source,
        })?;
        Ok(Self {
            backend: Backend::Dir(dir.to_path_buf()),
            #[cfg(test)]
            gate: None,
        })
    }

    /// The state in etcd (connected with [`crate::etcd::EtcdStore::connect`]).
    pub fn etcd(store: crate::etcd::EtcdStore) -> Self {
        Self {
            backend: Backend::Etcd(Box::new(store)),
            #[cfg(test)]
            gate: None,
        }
    }

    /// The etcd backend, if that is where the state lives.
    pub fn etcd_store(&self) -> Option<&crate::etcd::EtcdStore> {
        match &self.backend {
            Backend::Etcd(etcd) => Some(etcd),
            Backend::Dir(_) => None,
        }
    }

    /// Where the state lives, for messages: the state directory, or etcd's endpoints and
    /// prefix.
    pub fn describe(&self) -> String {
        match &self.backend {
            Backend::Dir(dir) => dir.display().to_string(),
            Backend::Etcd(etcd) => etcd.describe(),
        }
    }

    /// Whether a write can be tried now: false while the etcd watch is down (no quorum, or
    /// no member reachable), so a change fails at once rather than at a timeout.
    pub fn writable(&self) -> bool {
        match &self.backend {
            Backend::Dir(_) => true,
            Backend::Etcd(etcd) => etcd.available(),
        }
    }

    /// Reads the state; an empty directory (or etcd prefix) is a fresh start.
    pub fn load(&self) -> Result<State, StoreError> {
        let dir = match &self.backend {
            Backend::Dir(dir) => dir,
            Backend::Etcd(etcd) => return etcd.load(),
        };
        let path = dir.join(STATE_FILE);
        let bytes = match fs::read(&path) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Ok(State {
                    format: FORMAT,
                    ..State::default()
                })
            }
            Err(source) => {
                return Err(StoreError::Io {
                    what: "cannot read",
                    path,
                    source,
                })
            }
        };
        let state: State =
            serde_json::from_slice(&bytes).map_err(|source| StoreError::Corrupt {
                path: path.clone(),
                source,
            })?;
        if state.format != FORMAT {
            return Err(StoreError::Format {
                path,
                found: state.format,
            });
        }
        let mut state = state;
        state.rejections.enforce_bounds();
        Ok(state)
    }

    /// [`Self::save`] of an import of the policy directory: in etcd, it commits only while
    /// this replica leads ([`crate::etcd::EtcdStore::save_fenced`]); a state directory's one
    /// replica always leads.
    pub fn save_import(&self, state: &State) -> Result<i64, StoreError> {
        self.commit(state, Commit::Version, true)
    }

    /// Replaces the state durably (write, fsync, rename, fsync the directory; in etcd, one
    /// transaction that commits only if nobody wrote since `state.revision`). Returns the
    /// store's revision after the write.
    pub fn save(&self, state: &State) -> Result<i64, StoreError> {
        self.commit(state, Commit::Version, false)
    }

    /// [`Self::save`] ([`Self::save_import`] when `import`) of what `commit` says: in etcd,
    /// [`Commit::Head`] leaves the history records alone (a state directory's one file is
    /// written whole either way).
    pub fn commit(&self, state: &State, commit: Commit, import: bool) -> Result<i64, StoreError> {
        #[cfg(test)]
        if let Some(gate) = &self.gate {
            let _ = gate.entered.send(());
            if let Ok(release) = gate.release.lock() {
                let _ = release.recv_timeout(std::time::Duration::from_secs(10));
            }
        }
        let dir = match &self.backend {
            Backend::Dir(dir) => dir,
            Backend::Etcd(etcd) if import => return etcd.save_fenced(state, commit),
            Backend::Etcd(etcd) => return etcd.save(state, commit),
        };
        let path = dir.join(STATE_FILE);
        let tmp = dir.join(format!("{STATE_FILE}.tmp"));
        let io = |what: &'static str, path: &Path| {
            let path = path.to_path_buf();
            move |source| StoreError::Io { what, path, source }
        };
        let json = serde_json::to_vec(state).map_err(|source| StoreError::Corrupt {
            path: tmp.clone(),
            source,
        })?;
        let mut file = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(&tmp)
            .map_err(io("cannot create", &tmp))?;
        file.write_all(&json).map_err(io("cannot write", &tmp))?;
        file.sync_all().map_err(io("cannot fsync", &tmp))?;
        drop(file);
        fs::rename(&tmp, &path).map_err(io("cannot rename onto", &path))?;
        File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(io("cannot fsync", dir))?;
        Ok(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(version: u64) -> VersionRecord {
        let mut documents = BTreeMap::new();
        documents.insert(
            "a.yaml".to_string(),
            StoredDoc {
                text: format!("# v{version}\n"),
                source: Source::File,
                changed_at: version,
            },
        );
        VersionRecord {
            version,
            at_ms: 1,
            cause: "test".into(),
            documents,
        }
    }

    #[test]
    fn round_trips_and_keeps_the_last_fifty() {
        let dir = std::env::temp_dir().join(format!("outrider-store-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        let store = Store::open(&dir).expect("open");
        let mut state = store.load().expect("fresh");
        assert_eq!(state.version, 0);
        for v in 1..=60 {
            state.push(record(v));
        }
        state.seen_files.insert("a.yaml".into(), "h".into());
        store.save(&state).expect("save");
        let back = store.load().expect("load");
        assert_eq!(back, state);
        assert_eq!(back.history.len(), HISTORY_LEN);
        assert_eq!(back.history.front().map(|r| r.version), Some(11));
        assert_eq!(back.current()["a.yaml"].text, "# v60\n");
        assert!(!dir.join("state.json.tmp").exists());
        fs::write(dir.join(STATE_FILE), b"{not json").expect("write");
        assert!(matches!(store.load(), Err(StoreError::Corrupt { .. })));
        let _ = fs::remove_dir_all(&dir);
    }
}
