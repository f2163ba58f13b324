//! The span exporter: requests' spans queued without waiting (dropped and counted when the
//! queue is full), batched and sent over OTLP/HTTP by their own task.

use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwapOption;
use opentelemetry::InstrumentationScope;
use opentelemetry_proto::transform::common::tonic::ResourceAttributesWithSchema;
use outrider_config::Otlp;
use tokio::sync::mpsc;
use tokio::time::Instant;

use super::{otlp, span};
use crate::telemetry::metrics::TelemetryMetrics;

/// Requests' spans waiting for export at most (a request queues its span and its attempts'
/// as one item); beyond it they are dropped (and counted).
pub const SPAN_QUEUE: usize = 4096;
/// Requests' spans per export request.
const SPAN_BATCH: usize = 512;
/// The longest a span waits for its batch to fill.
const SPAN_BATCH_DELAY: Duration = Duration::from_millis(500);
/// Bound on one export try; a slow collector costs spans, never memory.
const EXPORT_TIMEOUT: Duration = Duration::from_secs(5);

/// The span exporter could not be built from the policy, or its thread not started.
#[derive(Debug, thiserror::Error)]
pub enum ExporterError {
    /// The collector settings are unusable.
    #[error("tracing.otlp: {0}")]
    Setup(#[from] otlp::SetupError),
    /// The export thread or its runtime could not be started.
    #[error("tracing.otlp: cannot start the export thread: {0}")]
    Thread(#[source] std::io::Error),
}

/// The span exporter in force: none, or one [`SpanSink`] for the policy's `tracing.otlp`.
/// Replaced when a reload changes the collector settings; the old sink is flushed in the
/// background.
pub struct Spans {
    current: ArcSwapOption<SpanSink>,
    workload: String,
    metrics: TelemetryMetrics,
    ca_file: Option<std::path::PathBuf>,
}

impl Spans {
    /// No exporter until [`Spans::configure`]; `https://` collectors are verified against
    /// `ca_file`, or the system's trust roots without it.
    pub fn new(
        workload: &str,
        metrics: TelemetryMetrics,
        ca_file: Option<std::path::PathBuf>,
    ) -> Self {
        Self {
            current: ArcSwapOption::empty(),
            workload: workload.to_string(),
            metrics,
            ca_file,
        }
    }

    /// The sink spans go to, if any.
    pub fn sink(&self) -> Option<Arc<SpanSink>> {
        self.current.load_full()
    }

    /// Puts the policy's collector settings in force (a no-op when unchanged). Must run inside
    /// the runtime.
    pub fn configure(&self, otlp: Option<&Otlp>) {
        let current = self.current.load();
        if current.as_ref().map(|sink| &sink.otlp) == otlp {
            return;
        }
        let start = |otlp| {
            SpanSink::start(
                otlp,
                &self.workload,
                self.ca_file.as_deref(),
                self.metrics.clone(),
            )
        };
        let next = match otlp.map(start) {
            None => None,
            Some(Ok(sink)) => Some(Arc::new(sink)),
            Some(Err(error)) => {
                tracing::error!(%error, "span export disabled");
                None
            }
        };
        if let Some(old) = self.current.swap(next) {
            tokio::spawn(async move { old.shutdown(EXPORT_TIMEOUT).await });
        }
    }

    /// Flushes and stops the exporter in force; bounded by `timeout`.
    pub async fn shutdown(&self, timeout: Duration) {
        if let Some(sink) = self.current.swap(None) {
            sink.shutdown(timeout).await;
        }
    }
}

/// Where sampled spans go: a bounded queue drained by a task that exports in batches over
/// OTLP (gRPC or HTTP/protobuf, see [`otlp`]). While a batch is retried, new spans wait in the
/// queue; when it is full they are dropped and counted.
///
/// The export task runs on a thread of its own (`outrider-otlp`, a one-thread runtime): on the
/// request workers it waited its turn behind every busy connection at each step of an export
/// (encode, write, read the answer), so under load a batch took tens of milliseconds and the
/// queue overflowed with CPU to spare. On its own thread the kernel schedules it as soon as
/// it wakes, and its work is the same.
pub struct SpanSink {
    otlp: Otlp,
    queue: mpsc::Sender<span::RequestSpan>,
    /// Wakes the export task once a batch's worth is queued (see `export_loop`).
    batch_ready: Arc<tokio::sync::Notify>,
    metrics: TelemetryMetrics,
    /// Fires when the export thread has flushed and ended.
    done: std::sync::Mutex<Option<tokio::sync::oneshot::Receiver<()>>>,
    stop: tokio::sync::watch::Sender<bool>,
}

impl SpanSink {
    /// Starts the export thread for `otlp`; spans carry the resource `service.name` =
    /// `workload` plus whatever `OTEL_RESOURCE_ATTRIBUTES` sets.
    pub fn start(
        otlp: &Otlp,
        workload: &str,
        ca_file: Option<&std::path::Path>,
        metrics: TelemetryMetrics,
    ) -> Result<Self, ExporterError> {
        let collector = otlp::Collector::new(otlp, ca_file, EXPORT_TIMEOUT)?;
        // The builder reads OTEL_RESOURCE_ATTRIBUTES (and OTEL_SERVICE_NAME); the workload
        // name is set last so it wins for service.name.
        let resource = opentelemetry_sdk::Resource::builder()
            .with_service_name(workload.to_string())
            .build();
        let resource = ResourceAttributesWithSchema::from(&resource);
        let scope = InstrumentationScope::builder("outrider-proxy")
            .with_version(env!("CARGO_PKG_VERSION"))
            .build();
        let envelope = otlp::Envelope::new(&resource, &scope);
        let (queue, rx) = mpsc::channel(SPAN_QUEUE);
        let (stop, stop_rx) = tokio::sync::watch::channel(false);
        let batch_ready = Arc::new(tokio::sync::Notify::new());
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(ExporterError::Thread)?;
        let export = export_loop(
            collector,
            envelope,
            (rx, Arc::clone(&batch_ready)),
            stop_rx,
            metrics.clone(),
        );
        let (done_tx, done) = tokio::sync::oneshot::channel();
        std::thread::Builder::new()
            .name("outrider-otlp".to_string())
            .spawn(move || {
                runtime.block_on(export);
                let _ = done_tx.send(());
            })
            .map_err(ExporterError::Thread)?;
        Ok(Self {
            otlp: otlp.clone(),
            queue,
            batch_ready,
            metrics,
            done: std::sync::Mutex::new(Some(done)),
            stop,
        })
    }

    /// Queues a finished request's spans, or drops and counts them when the queue is full.
    /// They are encoded by the export task.
    pub fn record(&self, spans: span::RequestSpan) {
        match self.queue.try_send(spans) {
            // The export task gathers a batch on a timer and is woken early only once a
            // batch's worth waits: waking it for each span cost a task poll per request.
            Ok(()) => {
                if self.queue.capacity() <= SPAN_QUEUE - SPAN_BATCH {
                    self.batch_ready.notify_one();
                }
            }
            Err(refused) => {
                let spans = match &refused {
                    mpsc::error::TrySendError::Full(spans)
                    | mpsc::error::TrySendError::Closed(spans) => spans.count(),
                };
                self.metrics.spans_dropped.inc_by(spans);
            }
        }
    }

    /// Exports what is queued and stops the exporter; bounded by `timeout`.
    pub async fn shutdown(&self, timeout: Duration) {
        let _ = self.stop.send(true);
        let done = self.done.lock().ok().and_then(|mut done| done.take());
        if let Some(done) = done {
            if tokio::time::timeout(timeout, done).await.is_err() {
                tracing::warn!("span export did not finish before shutdown");
            }
        }
    }
}

/// Exports queued spans in batches: woken by the first span after an idle spell, it lets spans
/// gather until [`SPAN_BATCH`] wait (the sender's `batch_ready`) or [`SPAN_BATCH_DELAY`]
/// passed, without a wake-up per span.
async fn export_loop(
    mut collector: otlp::Collector,
    envelope: otlp::Envelope,
    (mut rx, batch_ready): (mpsc::Receiver<span::RequestSpan>, Arc<tokio::sync::Notify>),
    mut stop: tokio::sync::watch::Receiver<bool>,
    metrics: TelemetryMetrics,
) {
    let mut batch = Vec::with_capacity(SPAN_BATCH);
    let mut failures = otlp::FailureLog::default();
    let mut export = Export {
        collector: &mut collector,
        envelope: &envelope,
        metrics: &metrics,
        failures: &mut failures,
    };
    let mut open = true;
    while open {
        tokio::select! {
            span = rx.recv() => match span {
                Some(span) => batch.push(span),
                None => break,
            },
            () = crate::core::shutdown::stopped(&mut stop) => break,
        }
        // One timer per batch; the queue is read when it holds a batch or the timer fires.
        let delay = tokio::time::sleep_until(Instant::now() + SPAN_BATCH_DELAY);
        tokio::pin!(delay);
        loop {
            open = take_queued(&mut rx, &mut batch);
            if batch.len() == SPAN_BATCH || !open {
                break;
            }
            let due = tokio::select! {
                () = batch_ready.notified() => false,
                () = &mut delay => true,
                () = crate::core::shutdown::stopped(&mut stop) => true,
            };
            if due {
                // What came meanwhile goes in this batch.
                open = take_queued(&mut rx, &mut batch);
                break;
            }
        }
        export.send(&mut batch, &mut stop).await;
    }
    // Shutdown: flush whatever is queued (one try per batch: `stop` is set).
    rx.close();
    while let Some(span) = rx.recv().await {
        batch.push(span);
        if batch.len() == SPAN_BATCH {
            export.send(&mut batch, &mut stop).await;
        }
    }
    export.send(&mut batch, &mut stop).await;
}

/// Moves what is queued into `batch`, up to [`SPAN_BATCH`], without waiting; whether the
/// queue is still open. Taken together (`recv_many`), the queue's slots are given back at
/// once: one at a time (`try_recv`), each took the queue's lock.
fn take_queued(
    rx: &mut mpsc::Receiver<span::RequestSpan>,
    batch: &mut Vec<span::RequestSpan>,
) -> bool {
    use std::future::Future as _;
    use std::task::{Context, Poll, Waker};
    let room = SPAN_BATCH.saturating_sub(batch.len());
    if room == 0 {
        return true;
    }
    // Polled once: empty is `Pending`, not a wait (the loop waits on `batch_ready` and its
    // timer, and a later `recv` registers the task's waker again).
    let mut cx = Context::from_waker(Waker::noop());
    let recv = std::pin::pin!(rx.recv_many(batch, room));
    !matches!(recv.poll(&mut cx), Poll::Ready(0))
}

/// What exporting a batch needs, held by the export task.
struct Export<'a> {
    collector: &'a mut otlp::Collector,
    envelope: &'a otlp::Envelope,
    metrics: &'a TelemetryMetrics,
    failures: &'a mut otlp::FailureLog,
}

impl Export<'_> {
    /// Encodes and delivers `batch` (with retries), counting its spans exported or dropped.
    async fn send(
        &mut self,
        batch: &mut Vec<span::RequestSpan>,
        stop: &mut tokio::sync::watch::Receiver<bool>,
    ) {
        if batch.is_empty() {
            return;
        }
        let n: u64 = batch.iter().map(span::RequestSpan::count).sum();
        let encoded = otlp::encode(batch, self.envelope);
        batch.clear();
        match otlp::deliver(self.collector, &encoded, stop).await {
            Ok(()) => self.metrics.spans_exported.inc_by(n),
            Err(error) => {
                self.failures.dropped(&error, n);
                self.metrics.spans_dropped.inc_by(n);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn queued_spans_are_taken_up_to_a_batch_without_waiting() {
        let one = || span::tests::corpus().swap_remove(0);
        let (tx, mut rx) = mpsc::channel(SPAN_BATCH + 3);
        let mut batch = Vec::new();
        // Empty: nothing taken, still open, and no wait.
        assert!(take_queued(&mut rx, &mut batch));
        assert!(batch.is_empty());
        for _ in 0..SPAN_BATCH + 3 {
            tx.try_send(one()).expect("room");
        }
        assert!(tx.try_send(one()).is_err(), "full");
        assert!(take_queued(&mut rx, &mut batch));
        assert_eq!(batch.len(), SPAN_BATCH, "a batch at most");
        assert!(
            take_queued(&mut rx, &mut batch),
            "a full batch takes nothing"
        );
        assert_eq!(batch.len(), SPAN_BATCH);
        batch.clear();
        // The slots taken are free again.
        for _ in 0..SPAN_BATCH {
            tx.try_send(one()).expect("slots given back");
        }
        drop(tx);
        // Closed: what is left is taken, a batch at a time, then the queue says so.
        assert!(take_queued(&mut rx, &mut batch));
        assert_eq!(batch.len(), SPAN_BATCH);
        batch.clear();
        assert!(take_queued(&mut rx, &mut batch));
        assert_eq!(batch.len(), 3);
        assert!(!take_queued(&mut rx, &mut batch), "closed and empty");
    }
}
