//! The control plane's durable state: every accepted version's documents (the last
//! [`HISTORY_LEN`]), the current version number and which file contents were already seen.
//! One JSON file, `state.json`, replaced atomically: written to a temporary file, fsynced,
//! renamed over the old one, and the directory fsynced so the rename itself survives a crash.
//! A crash at any point leaves either the old or the new state, never a torn one.

use std::collections::{BTreeMap, VecDeque};
use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// Versions kept for `history` and `rollback`.
pub const HISTORY_LEN: usize = 50;
const STATE_FILE: &str = "state.json";
const FORMAT: u32 = 1;

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
}

/// The state directory.
#[derive(Debug, Clone)]
pub struct Store {
    dir: PathBuf,
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

impl Store {
    /// Opens (creating it if needed) the state directory.
    pub fn open(dir: &Path) -> Result<Self, StoreError> {
        fs::create_dir_all(dir).map_err(|source| StoreError::Io {
            what: "cannot create",
            path: dir.to_path_buf(),
            source,
        })?;
        Ok(Self {
            dir: dir.to_path_buf(),
            #[cfg(test)]
            gate: None,
        })
    }

    /// The state directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Reads the state; a directory without a state file is a fresh start.
    pub fn load(&self) -> Result<State, StoreError> {
        let path = self.dir.join(STATE_FILE);
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
        Ok(state)
    }

    /// Replaces the state durably (write, fsync, rename, fsync the directory).
    pub fn save(&self, state: &State) -> Result<(), StoreError> {
        #[cfg(test)]
        if let Some(gate) = &self.gate {
            let _ = gate.entered.send(());
            if let Ok(release) = gate.release.lock() {
                let _ = release.recv_timeout(std::time::Duration::from_secs(10));
            }
        }
        let path = self.dir.join(STATE_FILE);
        let tmp = self.dir.join(format!("{STATE_FILE}.tmp"));
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
        File::open(&self.dir)
            .and_then(|d| d.sync_all())
            .map_err(io("cannot fsync", &self.dir))?;
        Ok(())
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
