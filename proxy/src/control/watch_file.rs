//! `--policy FILE` hot reload. The file's parent directory is watched, not the file: editors
//! save by writing a new file and renaming it over the old one, and a Kubernetes ConfigMap
//! volume swaps a `..data` symlink, and a watch on the file itself would follow the old inode
//! and miss both. Events are debounced (a save is several events), the file is read once its
//! size and modification time hold still over the quiet period, and, if its content changed,
//! applied through the [`Reloader`]. An invalid file is logged with its file:line:column
//! diagnostics and the policy in force stays; so is an empty one: a save that truncates and
//! then writes (`cat > file`, many editors) is briefly empty, and an empty policy routes
//! nothing.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use notify::{Event, EventKind, RecursiveMode, Watcher};
use tokio::sync::mpsc;

use crate::control::reload::{ReloadError, Reloader};
use crate::http::shared::PolicySource;

/// Quiet period after the last event before the file is read: an editor's save or a ConfigMap
/// swap is a burst of events, and the file is read once at its end.
pub const DEBOUNCE: Duration = Duration::from_millis(50);
/// Longest wait for the file to hold still after the events went quiet; a file still changing
/// then is left for the events its writer keeps causing.
pub const SETTLE_MAX: Duration = Duration::from_secs(2);

/// The watch could not be set up.
#[derive(Debug, thiserror::Error)]
#[error("cannot watch {dir}: {source}")]
pub struct WatchError {
    dir: PathBuf,
    source: notify::Error,
}

/// Starts watching `path` and applying its changes; runs for the life of the process.
pub fn spawn(path: PathBuf, reloader: Arc<Reloader>) -> Result<(), WatchError> {
    let dir = match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let (tx, rx) = mpsc::unbounded_channel();
    let initial = tx.clone();
    let name = path.file_name().map(|name| name.to_os_string());
    // notify calls this on its own thread; an unbounded send never blocks it, and the
    // debouncer collapses whatever piles up.
    let mut watcher = notify::recommended_watcher(move |event: notify::Result<Event>| {
        if event.is_ok_and(|event| concerns_policy(&event, name.as_deref())) {
            let _ = tx.send(());
        }
    })
    .map_err(|source| WatchError {
        dir: dir.clone(),
        source,
    })?;
    watcher
        .watch(&dir, RecursiveMode::NonRecursive)
        .map_err(|source| WatchError {
            dir: dir.clone(),
            source,
        })?;
    // The file may have changed between its first read and this watch: look once more.
    let _ = initial.send(());
    tracing::info!(file = %path.display(), dir = %dir.display(), "watching the policy file");
    tokio::spawn(async move {
        // The watcher stops when dropped: it lives as long as this task.
        let _watcher = watcher;
        let mut rx = rx;
        while debounced(&mut rx, DEBOUNCE).await {
            reload(&path, &reloader).await;
        }
    });
    Ok(())
}

/// Whether `event` in the watched directory may have changed the policy file named `name`.
/// Access events are not changes, and the proxy's own read of the file causes them: reacting
/// to them would re-read the file forever. Other files in the directory (logs, say) are not
/// the policy either; `..`-prefixed names are the ConfigMap volume's `..data` swap.
fn concerns_policy(event: &Event, name: Option<&std::ffi::OsStr>) -> bool {
    if matches!(event.kind, EventKind::Access(_)) {
        return false;
    }
    // An event without paths (a queue overflow, say) may hide anything: look at the file.
    event.paths.is_empty()
        || event.paths.iter().any(|changed| {
            changed.file_name().is_some_and(|changed| {
                Some(changed) == name || changed.as_encoded_bytes().starts_with(b"..")
            })
        })
}

/// Waits for an event, then for `quiet` without one. False once the sender is gone.
pub async fn debounced(rx: &mut mpsc::UnboundedReceiver<()>, quiet: Duration) -> bool {
    if rx.recv().await.is_none() {
        return false;
    }
    loop {
        match tokio::time::timeout(quiet, rx.recv()).await {
            Ok(Some(())) => continue,
            Ok(None) | Err(_) => return true,
        }
    }
}

/// What identifies one state of the file without reading it: a writer still at work changes
/// the size or the modification time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Stamp {
    len: u64,
    modified: Option<std::time::SystemTime>,
}

async fn stamp(path: &Path) -> std::io::Result<Stamp> {
    let owned = path.to_path_buf();
    // metadata() follows the symlinks of a ConfigMap volume.
    let meta = tokio::task::spawn_blocking(move || std::fs::metadata(owned))
        .await
        .map_err(std::io::Error::other)??;
    Ok(Stamp {
        len: meta.len(),
        modified: meta.modified().ok(),
    })
}

/// Waits until `stamp` gives the same answer twice `quiet` apart; false (file still changing
/// or unreadable) after `max`.
async fn settled<F, Fut>(mut stamp: F, quiet: Duration, max: Duration) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = std::io::Result<Stamp>>,
{
    let deadline = tokio::time::Instant::now() + max;
    let Ok(mut last) = stamp().await else {
        return false;
    };
    while tokio::time::Instant::now() < deadline {
        tokio::time::sleep(quiet).await;
        let Ok(now) = stamp().await else {
            return false;
        };
        if now == last {
            return true;
        }
        last = now;
    }
    false
}

async fn reload(path: &Path, reloader: &Reloader) {
    if !settled(|| stamp(path), DEBOUNCE, SETTLE_MAX).await {
        tracing::debug!(file = %path.display(), "policy file still changing or missing; waiting for its next change");
        return;
    }
    let owned = path.to_path_buf();
    let read = tokio::task::spawn_blocking(move || std::fs::read_to_string(owned)).await;
    let text = match read.unwrap_or_else(|e| Err(std::io::Error::other(e))) {
        Ok(text) => text,
        Err(error) => {
            // Mid-swap the file can be briefly missing; the swap's last event brings us back.
            tracing::warn!(file = %path.display(), %error, "cannot read the policy file; keeping the policy in force");
            return;
        }
    };
    if text.trim().is_empty() {
        // Most likely a save caught between its truncate and its write; its write brings us
        // back. An empty policy would route nothing: to run without one, stop the proxy.
        tracing::warn!(file = %path.display(), "the policy file is empty; keeping the policy in force");
        return;
    }
    let file = path.display().to_string();
    match reloader
        .apply_text(&file, &text, None, PolicySource::File)
        .await
    {
        Ok(applied) if applied.changed => {
            reloader.shared().status.set_fresh(true);
        }
        Ok(_) => {}
        Err(ReloadError::Invalid(error)) => {
            tracing::error!(file = %file, error = %error, "invalid policy file; keeping the policy in force");
        }
        Err(error) => {
            tracing::error!(file = %file, %error, "policy file not applied; keeping the policy in force");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_burst_is_one_reload_after_the_quiet_period() {
        let (tx, mut rx) = mpsc::unbounded_channel();
        let started = tokio::time::Instant::now();
        let sender = tokio::spawn(async move {
            for _ in 0..5 {
                tx.send(()).expect("receiver alive");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            // Keep the channel open past the quiet period.
            tokio::time::sleep(Duration::from_secs(1)).await;
        });
        assert!(debounced(&mut rx, DEBOUNCE).await);
        // Last event at 80 ms, then 50 ms of quiet.
        assert_eq!(started.elapsed(), Duration::from_millis(130));
        // Nothing else was queued: the next wait ends only when the sender goes.
        assert!(!debounced(&mut rx, DEBOUNCE).await);
        sender.await.expect("sender task");
    }

    #[test]
    fn only_changes_to_the_policy_file_or_a_configmap_swap_count() {
        use notify::event::{AccessKind, AccessMode, CreateKind, ModifyKind, RenameMode};
        let name = Some(std::ffi::OsStr::new("policy.yaml"));
        let event = |kind, path: &str| Event::new(kind).add_path(PathBuf::from(path));
        let write = EventKind::Modify(ModifyKind::Any);
        assert!(concerns_policy(&event(write, "/etc/o/policy.yaml"), name));
        assert!(concerns_policy(
            &event(EventKind::Create(CreateKind::File), "/etc/o/policy.yaml"),
            name
        ));
        assert!(concerns_policy(
            &event(
                EventKind::Modify(ModifyKind::Name(RenameMode::To)),
                "/etc/o/..data"
            ),
            name
        ));
        // The proxy's own read of the file.
        let read = EventKind::Access(AccessKind::Close(AccessMode::Read));
        assert!(!concerns_policy(&event(read, "/etc/o/policy.yaml"), name));
        assert!(!concerns_policy(
            &event(
                EventKind::Access(AccessKind::Open(AccessMode::Any)),
                "/etc/o/policy.yaml"
            ),
            name
        ));
        // A log file written next to the policy.
        assert!(!concerns_policy(&event(write, "/etc/o/proxy.log"), name));
        assert!(concerns_policy(&Event::new(write), name));
    }

    #[tokio::test(start_paused = true)]
    async fn the_file_is_read_once_it_holds_still() {
        use std::sync::atomic::{AtomicU64, Ordering};
        // A writer that grows the file for its first 3 looks, then stops.
        let looks = AtomicU64::new(0);
        let growing = || {
            let n = looks.fetch_add(1, Ordering::SeqCst);
            async move {
                Ok(Stamp {
                    len: n.min(3),
                    modified: None,
                })
            }
        };
        let started = tokio::time::Instant::now();
        assert!(settled(growing, DEBOUNCE, SETTLE_MAX).await);
        // Looks at 0, 50, 100, 150 ms differ; the one at 200 ms matches.
        assert_eq!(started.elapsed(), Duration::from_millis(200));

        let never_still = AtomicU64::new(0);
        let started = tokio::time::Instant::now();
        let changing = || {
            let n = never_still.fetch_add(1, Ordering::SeqCst);
            async move {
                Ok(Stamp {
                    len: n,
                    modified: None,
                })
            }
        };
        assert!(!settled(changing, DEBOUNCE, SETTLE_MAX).await);
        assert_eq!(started.elapsed(), SETTLE_MAX);

        let missing = || async { Err(std::io::Error::from(std::io::ErrorKind::NotFound)) };
        assert!(!settled(missing, DEBOUNCE, SETTLE_MAX).await);
    }

    #[tokio::test(start_paused = true)]
    async fn ends_when_the_watcher_is_gone() {
        let (tx, mut rx) = mpsc::unbounded_channel::<()>();
        drop(tx);
        assert!(!debounced(&mut rx, DEBOUNCE).await);
    }
}
