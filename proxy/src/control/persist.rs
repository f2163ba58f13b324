//! The last good control-plane policy, kept in `--state-dir` so that a proxy restarted while
//! the control plane is down still starts with it. Written atomically (temporary file, fsync,
//! rename, fsync of the directory): a crash mid-write leaves the previous file whole.

use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

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

    #[test]
    fn a_corrupt_file_is_an_error_not_a_policy() {
        let dir = temp_dir("corrupt");
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join(FILE_NAME), b"{\"version\": 1").unwrap();
        assert!(matches!(load(&dir), Err(PersistError::Format { .. })));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
