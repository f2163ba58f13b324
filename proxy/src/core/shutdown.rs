//! The stop signal every long-lived task selects on: one `watch` channel, set once by a
//! shutdown.

use tokio::sync::watch;

/// Resolves once `stop` is true (or its sender is gone).
pub(crate) async fn stopped(stop: &mut watch::Receiver<bool>) {
    // The guard `wait_for` returns is not Send; drop it here, not across a select.
    let _ = stop.wait_for(|stop| *stop).await;
}
