//! Pod lifecycle: knowing when the local app has gone, so a shutting-down sidecar keeps
//! serving the app's outbound calls for as long as the app still makes them.
//!
//! On SIGTERM the inbound listener drains at once (the pod is leaving its Services), but an app
//! that makes calls during its own shutdown (flushing a queue, deregistering) would fail if the
//! outbound listeners closed with it. The app is taken to have gone when no outbound connection
//! (shared or dedicated port) has been open, and none opened or closed, for a quiet period: an
//! exited process has no sockets left, while a live one keeps its pool or opens new ones. The
//! drain timeout bounds the wait either way.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Notify;

/// How long outbound listeners must see no connection at all before the app counts as gone.
pub const APP_QUIET_PERIOD: Duration = Duration::from_secs(1);

/// Counts the app's open outbound connections; one per proxy, shared by the accept loops.
#[derive(Debug, Default)]
pub struct AppActivity {
    open: AtomicUsize,
    /// Bumped on every open and close, so a quiet period interrupted by a short connection
    /// (opened and closed between two looks) is still noticed.
    events: AtomicU64,
    changed: Notify,
}

impl AppActivity {
    /// Records a newly accepted connection; it counts until the guard is dropped.
    pub fn open(self: &Arc<Self>) -> ConnectionGuard {
        self.open.fetch_add(1, Ordering::AcqRel);
        self.touch();
        ConnectionGuard(Arc::clone(self))
    }

    /// Connections open now.
    pub fn open_connections(&self) -> usize {
        self.open.load(Ordering::Acquire)
    }

    fn touch(&self) {
        self.events.fetch_add(1, Ordering::AcqRel);
        self.changed.notify_waiters();
    }

    /// Resolves once no connection has been open, opened or closed for `quiet`.
    pub async fn gone(&self, quiet: Duration) {
        loop {
            let changed = self.changed.notified();
            tokio::pin!(changed);
            // Registered before the state is read, so no change between the read and the wait
            // is missed.
            changed.as_mut().enable();
            let events = self.events.load(Ordering::Acquire);
            if self.open.load(Ordering::Acquire) > 0 {
                changed.await;
                continue;
            }
            tokio::select! {
                () = tokio::time::sleep(quiet) => {
                    if self.events.load(Ordering::Acquire) == events {
                        return;
                    }
                }
                () = &mut changed => {}
            }
        }
    }
}

/// An open app connection; dropping it records the close.
#[derive(Debug)]
pub struct ConnectionGuard(Arc<AppActivity>);

impl Drop for ConnectionGuard {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Ordering::AcqRel);
        self.0.touch();
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use tokio::time::Instant;

    const QUIET: Duration = Duration::from_secs(1);

    #[tokio::test(start_paused = true)]
    async fn no_connections_means_gone_after_the_quiet_period() {
        let activity = Arc::new(AppActivity::default());
        let start = Instant::now();
        activity.gone(QUIET).await;
        assert_eq!(start.elapsed(), QUIET);
    }

    #[tokio::test(start_paused = true)]
    async fn an_open_connection_holds_until_closed_plus_quiet() {
        let activity = Arc::new(AppActivity::default());
        let conn = activity.open();
        let start = Instant::now();
        let closer = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_secs(5)).await;
            drop(conn);
        });
        activity.gone(QUIET).await;
        assert_eq!(start.elapsed(), Duration::from_secs(6));
        closer.await.unwrap();
        assert_eq!(activity.open_connections(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn short_connections_inside_the_quiet_period_restart_it() {
        let activity = Arc::new(AppActivity::default());
        let app = Arc::clone(&activity);
        let start = Instant::now();
        // The app makes a quick call every 600 ms, three times: never a full quiet second
        // until the last one.
        let calls = tokio::spawn(async move {
            for _ in 0..3 {
                tokio::time::sleep(Duration::from_millis(600)).await;
                drop(app.open());
            }
        });
        activity.gone(QUIET).await;
        assert_eq!(start.elapsed(), Duration::from_millis(1800) + QUIET);
        calls.await.unwrap();
    }
}
