//! Watching the policy directory. The directory is watched, not the files: editors replace
//! files by rename, and a Kubernetes ConfigMap volume swaps a `..data` symlink to a new
//! timestamped directory, so the visible `name.yaml -> ..data/name.yaml` links change target
//! without any event on the link itself. Any event therefore triggers a rescan of the whole
//! directory after a quiet period ([`QUIET`]), and the scan's contents, not the events, decide
//! what changed. A scan counts once every file held still (same size and modification time)
//! over one more quiet period, and an empty file is left as it was: a save that truncates and
//! then writes is briefly empty, and an empty document must not reach the fleet. To remove a
//! document, delete its file.
//!
//! A change the state directory could not take is not dropped: the directory is rescanned
//! after [`STORE_RETRY_BASE`], doubling up to [`STORE_RETRY_MAX`], until the change is written
//! (or a new burst of events rescans it sooner).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use notify::{EventKind, RecursiveMode, Watcher};
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;

use crate::engine::{Engine, ScannedFile};

/// Quiet period after the last event before the directory is rescanned: a burst of edits
/// (an editor's write+rename, a ConfigMap swap of many files) becomes one version.
pub const QUIET: Duration = Duration::from_millis(50);
/// Longest a rescan waits behind a stream of events that never goes quiet.
pub const MAX_DELAY: Duration = Duration::from_millis(500);
/// Longest a scan waits for the files to hold still; a directory still changing then is
/// rescanned at the next burst of events its writers cause.
pub const SETTLE_MAX: Duration = Duration::from_secs(2);

/// First wait before rescanning when the state directory refused the last change.
pub const STORE_RETRY_BASE: Duration = Duration::from_millis(250);
/// Longest wait between such retries: a few seconds, so a repaired disk (space freed, volume
/// remounted read-write) gets the change soon, at the cost of one scan and one failed write
/// per period while it stays broken.
pub const STORE_RETRY_MAX: Duration = Duration::from_secs(5);

/// The wait before the `attempt`th retry (0-based): [`STORE_RETRY_BASE`] doubled per attempt,
/// at most [`STORE_RETRY_MAX`]. No jitter: one control plane retries alone.
pub fn store_retry_delay(attempt: u32) -> Duration {
    STORE_RETRY_BASE
        .checked_mul(1u32.checked_shl(attempt).unwrap_or(u32::MAX))
        .map_or(STORE_RETRY_MAX, |delay| delay.min(STORE_RETRY_MAX))
}

/// A directory scan: readable policy files by name, and names that could not be read (left
/// as they are rather than taken for deleted).
#[derive(Debug, Default)]
pub struct Scan {
    /// File name to content and modification time.
    pub files: BTreeMap<String, ScannedFile>,
    /// Files that exist but could not be read, or read empty.
    pub unreadable: BTreeSet<String>,
    /// Size and modification time of every file read, to tell whether it held still.
    stamps: BTreeMap<String, Stamp>,
}

/// Size and modification time: a writer still at work changes one of them.
type Stamp = (u64, Option<std::time::SystemTime>);

fn stamp(path: &Path) -> std::io::Result<Stamp> {
    let meta = std::fs::metadata(path)?;
    Ok((meta.len(), meta.modified().ok()))
}

/// Reads every `*.yaml`/`*.yml` in `dir`, following symlinks and skipping hidden entries
/// (`..data` and the timestamped directories of a ConfigMap volume).
pub fn scan(dir: &Path) -> std::io::Result<Scan> {
    let mut out = Scan::default();
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let Ok(name) = entry.file_name().into_string() else {
            continue;
        };
        if name.starts_with('.') || !(name.ends_with(".yaml") || name.ends_with(".yml")) {
            continue;
        }
        let path = entry.path();
        // metadata() follows symlinks: a ConfigMap file is a link into `..data`.
        let read = std::fs::metadata(&path).and_then(|meta| {
            if !meta.is_file() {
                return Ok(None);
            }
            let text = std::fs::read_to_string(&path)?;
            let modified = meta.modified()?;
            Ok(Some((
                ScannedFile { text, modified },
                (meta.len(), Some(modified)),
            )))
        });
        match read {
            Ok(Some((file, stamp))) => {
                out.stamps.insert(name.clone(), stamp);
                if file.text.trim().is_empty() {
                    tracing::warn!(file = %path.display(), "policy file is empty; keeping its previous version (delete the file to remove the document)");
                    out.unreadable.insert(name);
                } else {
                    out.files.insert(name, file);
                }
            }
            Ok(None) => {}
            Err(e) => {
                tracing::warn!(file = %path.display(), error = %e, "cannot read policy file; keeping its previous version");
                out.unreadable.insert(name);
            }
        }
    }
    Ok(out)
}

/// Whether every file of `scan` still has the size and modification time it was read with.
fn held_still(dir: &Path, scan: &Scan) -> bool {
    scan.stamps
        .iter()
        .all(|(name, read)| stamp(&dir.join(name)).is_ok_and(|now| now == *read))
}

/// Scans `dir` until a scan's files hold still for `quiet`; `None` when they do not within
/// `max`. Blocking: it sleeps between looks.
pub fn settled_scan(dir: &Path, quiet: Duration, max: Duration) -> std::io::Result<Option<Scan>> {
    let deadline = std::time::Instant::now() + max;
    loop {
        let scan = scan(dir)?;
        std::thread::sleep(quiet);
        if held_still(dir, &scan) {
            return Ok(Some(scan));
        }
        if std::time::Instant::now() >= deadline {
            return Ok(None);
        }
    }
}

/// Scans `dir` once its files hold still and hands the result to the engine.
pub fn sync(dir: &Path, engine: &Engine) {
    match settled_scan(dir, QUIET, SETTLE_MAX) {
        Ok(None) => {
            tracing::warn!(dir = %dir.display(), "policy files still changing; waiting for their next change")
        }
        Ok(Some(scan)) => match engine.sync_files(scan.files, &scan.unreadable) {
            Ok(_) => {}
            Err(e @ crate::engine::EngineError::NotLeader) => tracing::info!(error = %e),
            Err(e) => tracing::error!(error = %e, "cannot apply policy file changes"),
        },
        Err(e) => {
            tracing::error!(dir = %dir.display(), error = %e, "cannot scan the policy directory")
        }
    }
}

/// Waits for a burst of signals on `rx` to end: returns after `quiet` without a signal, or
/// `max` after the burst's first signal, whichever is first. `None` when the channel closed.
pub async fn debounce(rx: &mut mpsc::Receiver<()>, quiet: Duration, max: Duration) -> Option<()> {
    rx.recv().await?;
    let deadline = Instant::now() + max;
    loop {
        let until = (Instant::now() + quiet).min(deadline);
        match tokio::time::timeout_at(until, rx.recv()).await {
            Ok(Some(())) if Instant::now() < deadline => continue,
            Ok(Some(())) | Err(_) => return Some(()),
            Ok(None) => return None,
        }
    }
}

/// Starts watching `dir`; while this replica leads (`leader`, always with a state directory),
/// syncs it once (blocking), then syncs every burst of changes into `engine`, and retries
/// changes the state directory refused ([`store_retry_delay`]). A replica that becomes the
/// leader first catches up with the store (what the previous leader imported), then syncs:
/// the scan is compared with the content hashes the store holds, so an edit the previous
/// leader committed is not imported again and one it did not is. The returned watcher must
/// be kept alive.
pub fn start(
    dir: PathBuf,
    engine: Arc<Engine>,
    mut leader: watch::Receiver<bool>,
) -> notify::Result<notify::RecommendedWatcher> {
    let (tx, mut rx) = mpsc::channel::<()>(1);
    let mut watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        match event {
            // Our own reads during a scan are not changes.
            Ok(event) if matches!(event.kind, EventKind::Access(_)) => {}
            // A full channel already holds a pending signal: this event is covered.
            Ok(_) => {
                let _ = tx.try_send(());
            }
            Err(e) => {
                tracing::warn!(error = %e, "policy directory watch error; rescanning");
                let _ = tx.try_send(());
            }
        }
    })?;
    // Watch first, then scan: an edit between the two is seen by the watcher.
    watcher.watch(&dir, RecursiveMode::NonRecursive)?;
    if *leader.borrow_and_update() {
        sync(&dir, &engine);
    }
    tokio::spawn(async move {
        let mut retries = 0u32;
        loop {
            let leading = *leader.borrow();
            let retry = if leading && engine.file_changes_pending() {
                let delay = store_retry_delay(retries);
                retries = retries.saturating_add(1);
                tracing::warn!(
                    delay = %outrider_config::Duration(delay),
                    "policy file changes not yet written to the state directory; retrying"
                );
                Some(delay)
            } else {
                retries = 0;
                None
            };
            let gained = tokio::select! {
                signalled = debounce(&mut rx, QUIET, MAX_DELAY) => {
                    if signalled.is_none() {
                        return;
                    }
                    false
                }
                () = sleep_or_never(retry) => false,
                () = leadership_changed(&mut leader) => *leader.borrow_and_update(),
            };
            if !*leader.borrow() {
                // Another replica imports the directory (or will, once elected).
                continue;
            }
            let dir = dir.clone();
            let engine = Arc::clone(&engine);
            // File reads and the fsync of the new state are blocking work.
            let _ = tokio::task::spawn_blocking(move || {
                if gained {
                    if let Err(e) = engine.catch_up() {
                        tracing::warn!(error = %e, "cannot read the store before importing the policy directory; importing on the view");
                    }
                }
                sync(&dir, &engine);
                if gained {
                    tracing::info!(
                        version = engine.version(),
                        "leader's import of the policy directory done"
                    );
                }
            })
            .await;
        }
    });
    Ok(watcher)
}

async fn sleep_or_never(delay: Option<Duration>) {
    match delay {
        Some(delay) => tokio::time::sleep(delay).await,
        None => std::future::pending().await,
    }
}

/// Returns when leadership changes; never once its sender is gone (it then stays as it is).
async fn leadership_changed(leader: &mut watch::Receiver<bool>) {
    if leader.changed().await.is_err() {
        std::future::pending::<()>().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_burst_becomes_one_rescan_after_the_quiet_period() {
        let (tx, mut rx) = mpsc::channel(1);
        let start = Instant::now();
        let sender = tokio::spawn(async move {
            for _ in 0..5 {
                let _ = tx.try_send(());
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            // Keep the channel open past the debounce.
            tokio::time::sleep(Duration::from_secs(10)).await;
        });
        debounce(&mut rx, QUIET, MAX_DELAY).await.expect("signal");
        // Last signal at 80 ms, then 50 ms of quiet.
        assert_eq!(start.elapsed(), Duration::from_millis(130));
        sender.abort();
    }

    #[tokio::test(start_paused = true)]
    async fn a_burst_that_never_ends_is_cut_at_max_delay() {
        let (tx, mut rx) = mpsc::channel(1);
        let start = Instant::now();
        let sender = tokio::spawn(async move {
            loop {
                let _ = tx.try_send(());
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        });
        debounce(&mut rx, QUIET, MAX_DELAY).await.expect("signal");
        assert_eq!(start.elapsed(), MAX_DELAY);
        sender.abort();
    }

    #[test]
    fn store_retries_double_up_to_the_cap() {
        let delays: Vec<u64> = (0..8)
            .map(|n| u64::try_from(store_retry_delay(n).as_millis()).unwrap_or(u64::MAX))
            .collect();
        assert_eq!(delays, [250, 500, 1000, 2000, 4000, 5000, 5000, 5000]);
        assert_eq!(store_retry_delay(u32::MAX), STORE_RETRY_MAX);
    }

    #[tokio::test(start_paused = true)]
    async fn closed_channel_ends() {
        let (tx, mut rx) = mpsc::channel::<()>(1);
        drop(tx);
        assert_eq!(debounce(&mut rx, QUIET, MAX_DELAY).await, None);
    }

    #[test]
    fn scan_follows_configmap_links_and_skips_hidden() {
        let dir = std::env::temp_dir().join(format!("outrider-scan-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let data = dir.join("..2026_11_23_10_00_00.1");
        std::fs::create_dir_all(&data).expect("mkdir");
        std::fs::write(data.join("a.yaml"), "services: {}\n").expect("write");
        std::os::unix::fs::symlink("..2026_11_23_10_00_00.1", dir.join("..data")).expect("link");
        std::os::unix::fs::symlink("..data/a.yaml", dir.join("a.yaml")).expect("link");
        std::fs::write(dir.join("notes.txt"), "x").expect("write");
        let scan = scan(&dir).expect("scan");
        assert_eq!(scan.files.keys().collect::<Vec<_>>(), ["a.yaml"]);
        assert_eq!(scan.files["a.yaml"].text, "services: {}\n");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
