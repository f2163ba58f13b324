//! The stop signal every long-lived task selects on: one `watch` channel, set once by a
//! shutdown.

use tokio::sync::watch;

/// Resolves once `stop` is true (or its sender is gone).
pub(crate) async fn stopped(stop: &mut watch::Receiver<bool>) {
    // The guard `wait_for` returns is not Send; drop it here, not across a select.
    let _ = stop.wait_for(|stop| *stop).await;
}

/// SIGTERM and SIGINT, caught from the moment [`Signals::install`] returns (a signal that
/// arrives before [`Signals::wait`] is kept for it).
pub struct Signals {
    streams: Option<(tokio::signal::unix::Signal, tokio::signal::unix::Signal)>,
}

impl Signals {
    /// Installs the handlers; needs a tokio runtime context.
    pub fn install() -> Self {
        use tokio::signal::unix::{signal, SignalKind};
        let streams = match (
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
        ) {
            (Ok(term), Ok(int)) => Some((term, int)),
            _ => None,
        };
        Self { streams }
    }

    /// Resolves at the first SIGTERM or SIGINT, including one received before this call.
    pub async fn wait(self) {
        let Some((mut term, mut int)) = self.streams else {
            // Without signal handlers the process can only be killed; run until then.
            std::future::pending::<()>().await;
            return;
        };
        tokio::select! {
            _ = term.recv() => tracing::info!("SIGTERM received"),
            _ = int.recv() => tracing::info!("SIGINT received"),
        }
    }
}
