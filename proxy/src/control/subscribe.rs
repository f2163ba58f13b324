//! The control-plane subscriber (`--control URL[,URL...]`): one long-lived subscription stream
//! per proxy (the protocol is in [`outrider_config::wire`]), over prior-knowledge HTTP/2 so the
//! stream and the ACKs share one connection, to one control-plane replica at a time.
//!
//! Each [`PolicyUpdate`] is applied through the [`Reloader`] (build whole, bind, one store) and
//! answered with an ACK, or a NACK with the reason while the previous policy stays. Applied
//! policies are persisted in the state directory. When the stream ends, errors, or stays silent
//! for three heartbeat periods, the subscriber reconnects after a capped, fully jittered
//! backoff, to the next replica ([`Rotation`]), and resumes with the version and hash it has, so
//! an unchanged policy is not pushed again (replicas share one store, so one version's content
//! is the same on each).

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use http::header::{HeaderValue, AUTHORIZATION, CONTENT_TYPE};
use http::{Method, Request, StatusCode};
use http_body::Body;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use outrider_config::wire::{
    self, Ack, PolicyUpdate, ServerMessage, ACK_PATH, HEARTBEAT_SECS, MAX_LINE, SESSION_HEADER,
    SUBSCRIBE_PATH,
};

use crate::control::client::{ControlClient, Token};
use crate::control::persist::{self, Persisted, Persister};
use crate::control::reload::{ReloadError, Reloader};
use crate::control::replicas::{NoReplica, Replica, Replicas, Rotation};
use crate::http::shared::{ControlReplica, PolicySource};

/// First reconnect delay cap; doubles per failed attempt.
pub const BACKOFF_BASE: Duration = Duration::from_millis(100);
/// Largest reconnect delay.
pub const BACKOFF_MAX: Duration = Duration::from_secs(10);
/// A stream silent this long (three missed heartbeats) is taken as dead.
pub const SILENCE_LIMIT: Duration = Duration::from_secs(3 * HEARTBEAT_SECS);
/// Longest wait for a TCP connection to a control-plane replica: past it, the next is tried.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// Longest wait for the response head of a subscribe or an ACK.
const RESPONSE_TIMEOUT: Duration = Duration::from_secs(10);

/// How to reach the control plane.
#[derive(Debug, Clone)]
pub struct ControlConfig {
    /// The control-plane replicas (`--control`), shared by the subscription and the
    /// certificate requests.
    pub replicas: Arc<Replicas>,
    /// The bearer token.
    pub token: Token,
    /// This proxy's id in the control plane's status.
    pub proxy_id: String,
    /// The workload whose merged policy this proxy receives.
    pub workload: String,
    /// Where the last good policy is persisted; `None` persists nothing.
    pub state_dir: Option<PathBuf>,
    /// The pod's projected service-account token, re-read at every subscription and
    /// certificate request (the kubelet refreshes it), for a control plane that binds
    /// workloads and identities to service accounts (`--sa-jwks`).
    pub service_account_token: Option<PathBuf>,
}

/// Reads the pod's service-account token at `path` as a header value. Read at each request,
/// not once: projected tokens rotate.
pub fn read_service_account_token(path: &Path) -> std::io::Result<HeaderValue> {
    let token = std::fs::read_to_string(path)?;
    HeaderValue::try_from(token.trim())
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))
}

/// Why a subscription ended.
#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    /// The token file could not be read.
    #[error("cannot read the token file {path}: {source}")]
    Token {
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// The service-account token file could not be read.
    #[error("cannot read the service-account token {path}: {source}")]
    ServiceAccountToken {
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// The request could not be built (bad URL).
    #[error("bad control-plane URL: {0}")]
    Url(#[from] http::Error),
    /// No URL resolved to an address.
    #[error(transparent)]
    NoReplica(#[from] NoReplica),
    /// Connecting or sending failed.
    #[error("cannot reach the control plane: {0}")]
    Connect(#[from] hyper_util::client::legacy::Error),
    /// The control plane did not answer in time.
    #[error("the control plane did not answer within {0:?}")]
    Timeout(Duration),
    /// The token was refused.
    #[error("the control plane refused the token (401)")]
    Unauthorized,
    /// Any other refusal.
    #[error("the control plane answered {0}")]
    Status(StatusCode),
    /// The stream broke.
    #[error("subscription stream failed: {0}")]
    Stream(#[from] hyper::Error),
    /// Nothing arrived for three heartbeat periods.
    #[error("no heartbeat for {0:?}")]
    Silent(Duration),
    /// The server closed the stream.
    #[error("the control plane closed the stream")]
    Closed,
    /// A line was not a [`ServerMessage`].
    #[error("bad message on the stream: {0}")]
    Protocol(String),
    /// A line longer than the limit was skipped; the stream goes on.
    #[error("a {len}-byte message on the stream is longer than the {limit} bytes accepted")]
    TooLong {
        /// Its length so far (at least `limit`).
        len: usize,
        /// The limit.
        limit: usize,
        /// The version of the update, when its first bytes tell it.
        version: Option<u64>,
    },
}

/// Capped exponential backoff with full jitter: attempt `n` waits a uniformly random time in
/// `[0, min(max, base * 2^n)]`, so a fleet reconnecting at once spreads out.
#[derive(Debug, Clone)]
pub struct Backoff {
    base: Duration,
    max: Duration,
    attempt: u32,
    rng: fastrand::Rng,
}

impl Backoff {
    /// A backoff from `base` up to `max`.
    pub fn new(base: Duration, max: Duration) -> Self {
        Self::with_rng(base, max, fastrand::Rng::new())
    }

    /// Like [`Backoff::new`] with a given random source (tests replay a seed).
    pub fn with_rng(base: Duration, max: Duration, rng: fastrand::Rng) -> Self {
        Self {
            base,
            max,
            attempt: 0,
            rng,
        }
    }

    /// The upper bound of the next delay.
    pub fn cap(&self) -> Duration {
        crate::policy::backoff::ceiling(self.base, self.max, self.attempt)
    }

    /// The next delay.
    pub fn next_delay(&mut self) -> Duration {
        let cap = self.cap();
        self.attempt = self.attempt.saturating_add(1);
        let cap_ms = u64::try_from(cap.as_millis()).unwrap_or(u64::MAX);
        Duration::from_millis(self.rng.u64(0..=cap_ms))
    }

    /// Back to the first delay, after a successful connection.
    pub fn reset(&mut self) {
        self.attempt = 0;
    }
}

/// How one subscription attempt ended.
pub struct Attempt {
    /// The replica it went to, if one could be found.
    pub replica: Option<Replica>,
    /// The control plane accepted the subscription (200) before it ended.
    pub connected: bool,
    /// Why it ended.
    pub result: Result<(), SessionError>,
}

/// Runs `session` again and again until `stopped()`, waiting `backoff`'s next delay after
/// each; an attempt that connected resets the backoff, so a stream that breaks after working
/// is retried at once (within the first, shortest delay), on the next replica.
pub async fn reconnect_loop<F, Fut>(
    mut backoff: Backoff,
    mut session: F,
    stopped: impl Fn() -> bool,
) where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Attempt>,
{
    while !stopped() {
        let attempt = session().await;
        if attempt.connected {
            backoff.reset();
        }
        let delay = backoff.next_delay();
        let replica = attempt.replica.as_ref().map(ToString::to_string);
        match attempt.result {
            Err(SessionError::Unauthorized) => {
                tracing::error!(
                    delay = %outrider_config::Duration(delay),
                    replica,
                    "the control plane refused the token (401); retrying"
                )
            }
            Err(error) => {
                tracing::warn!(%error, delay = %outrider_config::Duration(delay), replica, "control-plane subscription ended; reconnecting to the next replica")
            }
            Ok(()) => {}
        }
        tokio::time::sleep(delay).await;
    }
}

/// Starts the subscriber; it runs until the proxy drains.
pub fn spawn(config: ControlConfig, reloader: Arc<Reloader>) {
    let mut connector = HttpConnector::new();
    connector.set_connect_timeout(Some(CONNECT_TIMEOUT));
    connector.set_nodelay(true);
    let client = Client::builder(TokioExecutor::new())
        .http2_only(true)
        .timer(TokioTimer::new())
        .pool_timer(TokioTimer::new())
        .build(connector);
    let persister = config.state_dir.clone().and_then(|dir| {
        let shared = reloader.shared();
        let on_disk = (shared.status.source() == PolicySource::Disk)
            .then(|| shared.snapshot.load().version);
        let health = Arc::clone(shared.status.persist());
        match Persister::new(dir, health, &shared.metrics, on_disk) {
            Ok(persister) => {
                let persister = Arc::new(persister);
                tokio::spawn(Arc::clone(&persister).retry());
                Some(persister)
            }
            Err(error) => {
                tracing::error!(%error, "cannot register the persistence metrics; the policy is not persisted");
                None
            }
        }
    });
    let subscriber = Subscriber {
        config,
        reloader,
        client,
        persister,
        session: std::sync::Mutex::new(String::new()),
        rotation: std::sync::Mutex::new(Rotation::default()),
    };
    tokio::spawn(subscriber.run());
}

struct Subscriber {
    config: ControlConfig,
    reloader: Arc<Reloader>,
    client: ControlClient,
    /// Writes applied policies to the state directory; `None` without one.
    persister: Option<Arc<Persister>>,
    /// The session id of the last subscription: its ACKs carry it, and the next subscription
    /// presents it, so the control plane lets this proxy replace a stream it has not yet
    /// noticed is dead.
    session: std::sync::Mutex<String>,
    /// The replica the next attempt goes to.
    rotation: std::sync::Mutex<Rotation>,
}

impl Subscriber {
    async fn run(self) {
        let shared = Arc::clone(self.reloader.shared());
        let this = &self;
        let session = || async move {
            let mut connected = false;
            let (replica, result) = match this.next_replica().await {
                Ok(replica) => {
                    let result = this.session(&replica, &mut connected).await;
                    (Some(replica), result)
                }
                Err(error) => (None, Err(error)),
            };
            this.set_connected(None);
            let status = &this.reloader.shared().status;
            if matches!(status.source(), PolicySource::Control | PolicySource::Disk) {
                status.set_fresh(false);
            }
            Attempt {
                replica,
                connected,
                result,
            }
        };
        let stopped = || shared.draining.load(std::sync::atomic::Ordering::Acquire);
        reconnect_loop(Backoff::new(BACKOFF_BASE, BACKOFF_MAX), session, stopped).await;
    }

    fn token(&self) -> Result<String, SessionError> {
        self.config
            .token
            .read()
            .map_err(|source| SessionError::Token {
                path: match &self.config.token {
                    Token::File(path) => path.clone(),
                    Token::Value(_) => PathBuf::new(),
                },
                source,
            })
    }

    fn session_id(&self) -> String {
        self.session.lock().map(|s| s.clone()).unwrap_or_default()
    }

    /// The replica after the last one tried, among the addresses the URLs resolve to now.
    async fn next_replica(&self) -> Result<Replica, SessionError> {
        let replicas = self.config.replicas.resolve().await?;
        let mut rotation = self.rotation.lock().unwrap_or_else(|e| e.into_inner());
        // `resolve` returns at least one replica, so there is always a next one.
        rotation
            .next(&replicas)
            .ok_or_else(|| NoReplica("no address".into()).into())
    }

    /// Records which replica the subscription is connected to, for the certificate requests
    /// and `/config`.
    fn set_connected(&self, replica: Option<Replica>) {
        let shown = replica.as_ref().map(|r| ControlReplica {
            url: Arc::clone(&r.url),
            address: r.address,
        });
        self.reloader.shared().status.set_control_replica(shown);
        self.config.replicas.set_connected(replica);
    }

    async fn session(&self, replica: &Replica, connected: &mut bool) -> Result<(), SessionError> {
        let token = self.token()?;
        let shared = self.reloader.shared();
        let mut uri = replica.uri(SUBSCRIBE_PATH);
        // `endpoints=1`: this proxy applies endpoint messages (`discovery: registry`).
        let _ = write!(
            uri,
            "?workload={}&proxy={}&{}=1",
            encode(&self.config.workload),
            encode(&self.config.proxy_id),
            wire::ENDPOINTS_QUERY,
        );
        let have = matches!(
            shared.status.source(),
            PolicySource::Control | PolicySource::Disk
        )
        .then(|| {
            let current = shared.snapshot.load();
            (current.version, current.content_hash.clone())
        });
        if let Some((version, hash)) = &have {
            let _ = write!(uri, "&have_version={version}&have_hash={}", encode(hash));
        }
        let last_session = self.session_id();
        if !last_session.is_empty() {
            let _ = write!(uri, "&session={}", encode(&last_session));
        }
        let mut request = Request::get(uri)
            .header(AUTHORIZATION, format!("Bearer {token}"))
            .body(Full::new(Bytes::new()))?;
        if let Some(path) = &self.config.service_account_token {
            let sa_token = read_service_account_token(path).map_err(|source| {
                SessionError::ServiceAccountToken {
                    path: path.clone(),
                    source,
                }
            })?;
            request
                .headers_mut()
                .insert(wire::SERVICE_ACCOUNT_TOKEN_HEADER, sa_token);
        }
        let response = tokio::time::timeout(RESPONSE_TIMEOUT, self.client.request(request))
            .await
            .map_err(|_| SessionError::Timeout(RESPONSE_TIMEOUT))??;
        match response.status() {
            StatusCode::OK => {}
            StatusCode::UNAUTHORIZED => return Err(SessionError::Unauthorized),
            status => return Err(SessionError::Status(status)),
        }
        *connected = true;
        let session = response
            .headers()
            .get(SESSION_HEADER)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_string();
        if let Ok(mut slot) = self.session.lock() {
            slot.clone_from(&session);
        }
        self.note_unselected(response.headers().contains_key(wire::UNSELECTED_HEADER));
        tracing::info!(replica = %replica.url, address = %replica.address, workload = %self.config.workload, "subscribed to the control plane");
        self.set_connected(Some(replica.clone()));
        if let Some((version, content_hash)) = have {
            // The server stays silent only when our hash is its hash; otherwise its first
            // message is the update, which replaces this one at once.
            shared.status.set_source(PolicySource::Control);
            shared.status.set_fresh(true);
            // Tell it what we run: a restarted control plane has no record of this proxy.
            let ack = Ack {
                proxy: self.config.proxy_id.clone(),
                workload: self.config.workload.clone(),
                version,
                content_hash,
                error: None,
                session: session.clone(),
            };
            self.send_ack(replica, &token, &ack).await;
        }
        let mut lines = Lines::new(response.into_body(), SILENCE_LIMIT);
        loop {
            let line = match lines.next_line().await {
                Ok(line) => line,
                Err(error @ SessionError::TooLong { version, .. }) => {
                    // Unreadable, so not applied: the policy in force is no longer known to be
                    // current, and the control plane hears why.
                    shared.status.set_fresh(false);
                    shared.metrics.policy_reloads.error.inc();
                    tracing::error!(%error, version, "control-plane update too long; keeping the policy in force");
                    let ack = Ack {
                        proxy: self.config.proxy_id.clone(),
                        workload: self.config.workload.clone(),
                        version: version.unwrap_or(0),
                        content_hash: String::new(),
                        error: Some(error.to_string()),
                        session: session.clone(),
                    };
                    self.send_ack(replica, &token, &ack).await;
                    continue;
                }
                Err(error) => return Err(error),
            };
            let message: ServerMessage =
                serde_json::from_slice(&line).map_err(|e| SessionError::Protocol(e.to_string()))?;
            match message {
                ServerMessage::Heartbeat => {}
                ServerMessage::Endpoints(update) => self.apply_endpoints(update),
                ServerMessage::Unknown => {
                    // A newer control plane's message kind: nothing this build can act on.
                    // Said once per process, not per message.
                    static SAID: std::sync::atomic::AtomicBool =
                        std::sync::atomic::AtomicBool::new(false);
                    if !SAID.swap(true, std::sync::atomic::Ordering::Relaxed) {
                        tracing::info!("control-plane message of a type this proxy does not know ignored (a newer control plane); further ones are logged at debug");
                    } else {
                        tracing::debug!("control-plane message of an unknown type ignored");
                    }
                }
                ServerMessage::Update(update) => {
                    match self.apply(replica, update, &session).await {
                        Some(ack) => self.send_ack(replica, &token, &ack).await,
                        // Draining: the update is neither applied nor refused; a restarted
                        // proxy will be sent it again.
                        None => return Ok(()),
                    }
                }
            }
        }
    }

    /// Records whether a policy document names this proxy's workload, logging each change: a
    /// proxy no document names runs only the defaults, most often because of a misspelt
    /// `--workload`.
    fn note_unselected(&self, unselected: bool) {
        let status = &self.reloader.shared().status;
        if status.unselected() == unselected {
            return;
        }
        status.set_unselected(unselected);
        if unselected {
            tracing::warn!(workload = %self.config.workload, "no policy document names this workload: it receives only the defaults (is --workload spelt right? `outriderctl check` lists the workloads documents name)");
        } else {
            tracing::info!(workload = %self.config.workload, "a policy document names this workload");
        }
    }

    /// Puts a registry service's pushed endpoints in force: only that service's endpoint set
    /// changes (no reload, so other services and the endpoints that stay keep their state).
    fn apply_endpoints(&self, update: wire::EndpointsUpdate) {
        let snapshot = self.reloader.shared().snapshot.load();
        if snapshot.set_registered_endpoints(&update.service, &update.addresses) {
            tracing::info!(service = %update.service, endpoints = update.addresses.len(), "registry endpoints updated");
        } else {
            tracing::debug!(service = %update.service, "endpoints of a service that is not a registry service of the policy in force ignored");
        }
    }

    /// Applies `update` and returns the ACK or NACK to send; `None` once the proxy drains.
    async fn apply(&self, replica: &Replica, update: PolicyUpdate, session: &str) -> Option<Ack> {
        let PolicyUpdate {
            version,
            content_hash,
            policy,
            unselected,
        } = update;
        // One line per push, not per heartbeat: which replica sent what is then in the logs
        // (and a push of a version the proxy already said it has would show here).
        tracing::info!(version, replica = %replica.url, address = %replica.address, "control-plane update received");
        self.note_unselected(unselected);
        let mut ack = Ack {
            proxy: self.config.proxy_id.clone(),
            workload: self.config.workload.clone(),
            version,
            content_hash: content_hash.clone(),
            error: None,
            session: session.to_string(),
        };
        let computed = outrider_config::content_hash(&policy);
        if computed != content_hash {
            ack.error = Some(format!(
                "content hash mismatch: update says {content_hash}, policy hashes to {computed}"
            ));
            self.reloader.shared().metrics.policy_reloads.error.inc();
            tracing::warn!(
                version,
                error = ack.error.as_deref(),
                "control-plane update rejected"
            );
            return Some(ack);
        }
        let file = format!("control-plane version {version}");
        match self
            .reloader
            .apply_text(&file, &policy, Some(version), PolicySource::Control)
            .await
        {
            Ok(applied) => {
                self.reloader.shared().status.set_fresh(true);
                if applied.changed {
                    self.persist(version, content_hash, policy).await;
                }
            }
            Err(ReloadError::ShuttingDown) => return None,
            Err(error) => {
                tracing::warn!(version, %error, "control-plane update rejected; keeping the policy in force");
                ack.error = Some(error.to_string());
            }
        }
        Some(ack)
    }

    async fn persist(&self, version: u64, content_hash: String, policy: String) {
        let Some(persister) = &self.persister else {
            return;
        };
        let state = Persisted {
            workload: self.config.workload.clone(),
            version,
            content_hash,
            policy,
        };
        persister.persist(state).await;
    }

    async fn send_ack(&self, replica: &Replica, token: &str, ack: &Ack) {
        let body = match serde_json::to_vec(ack) {
            Ok(body) => body,
            Err(error) => {
                tracing::warn!(%error, "cannot encode the ack");
                return;
            }
        };
        let request = Request::builder()
            .method(Method::POST)
            .uri(replica.uri(ACK_PATH))
            .header(AUTHORIZATION, format!("Bearer {token}"))
            .header(CONTENT_TYPE, "application/json")
            .body(Full::new(Bytes::from(body)));
        let Ok(request) = request else { return };
        match tokio::time::timeout(RESPONSE_TIMEOUT, self.client.request(request)).await {
            Ok(Ok(response)) if response.status().is_success() => {
                tracing::debug!(
                    version = ack.version,
                    nack = ack.error.is_some(),
                    "ack sent"
                );
            }
            Ok(Ok(response)) => {
                tracing::warn!(status = %response.status(), version = ack.version, "ack refused")
            }
            Ok(Err(error)) => tracing::warn!(%error, version = ack.version, "cannot send the ack"),
            Err(_) => tracing::warn!(version = ack.version, "ack timed out"),
        }
    }
}

/// Splits a streaming body into lines, failing when nothing arrives for `silence`. A line
/// longer than the limit is skipped (its bytes dropped as they come) and reported once as
/// [`SessionError::TooLong`]; the lines after it are read as usual.
pub struct Lines<B> {
    body: B,
    buf: BytesMut,
    silence: Duration,
    limit: usize,
    /// Within a too-long line: bytes dropped so far, and the version its start told.
    skipping: Option<(usize, Option<u64>)>,
}

impl<B> Lines<B>
where
    B: Body<Data = Bytes> + Unpin,
    SessionError: From<B::Error>,
{
    /// Lines of `body`, each at most [`MAX_LINE`] bytes.
    pub fn new(body: B, silence: Duration) -> Self {
        Self::with_limit(body, silence, MAX_LINE)
    }

    /// Lines of `body`, each at most `limit` bytes.
    pub fn with_limit(body: B, silence: Duration, limit: usize) -> Self {
        Self {
            body,
            buf: BytesMut::new(),
            silence,
            limit,
            skipping: None,
        }
    }

    /// The next non-empty line, without its newline.
    pub async fn next_line(&mut self) -> Result<Bytes, SessionError> {
        loop {
            if let Some(end) = self.buf.iter().position(|b| *b == b'\n') {
                let line = self.buf.split_to(end + 1).freeze();
                if let Some((dropped, version)) = self.skipping.take() {
                    return Err(SessionError::TooLong {
                        len: dropped.saturating_add(end),
                        limit: self.limit,
                        version,
                    });
                }
                let line = line.slice(..end);
                if line.iter().all(u8::is_ascii_whitespace) {
                    continue;
                }
                return Ok(line);
            }
            if self.buf.len() > self.limit || self.skipping.is_some() {
                // Drop what came so far rather than hold a policy we will not read.
                let buf = &self.buf;
                let skipping = self
                    .skipping
                    .get_or_insert_with(|| (0, update_version(buf)));
                skipping.0 = skipping.0.saturating_add(buf.len());
                self.buf.clear();
            }
            let frame = tokio::time::timeout(self.silence, self.body.frame())
                .await
                .map_err(|_| SessionError::Silent(self.silence))?;
            match frame {
                None => return Err(SessionError::Closed),
                Some(frame) => {
                    if let Ok(mut data) = frame?.into_data() {
                        while data.has_remaining() {
                            let chunk = data.chunk();
                            let n = chunk.len();
                            self.buf.extend_from_slice(chunk);
                            data.advance(n);
                        }
                    }
                }
            }
        }
    }
}

/// The `version` of an update line from its first bytes (`{"type":"update","version":N,...`),
/// so a line too long to read can still be answered for its version.
fn update_version(start: &[u8]) -> Option<u64> {
    const KEY: &[u8] = b"\"version\":";
    let head = &start[..start.len().min(256)];
    let at = head.windows(KEY.len()).position(|w| w == KEY)? + KEY.len();
    let digits: Vec<u8> = head[at..]
        .iter()
        .copied()
        .take_while(u8::is_ascii_digit)
        .collect();
    std::str::from_utf8(&digits).ok()?.parse().ok()
}

/// Percent-encodes a query value (everything but RFC 3986 unreserved characters).
pub fn encode(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for byte in value.bytes() {
        if byte.is_ascii_alphanumeric() || matches!(byte, b'-' | b'.' | b'_' | b'~') {
            out.push(char::from(byte));
        } else {
            let _ = write!(out, "%{byte:02X}");
        }
    }
    out
}

/// Reads the persisted policy for `workload` from `dir`, validated; `None` (with a log line)
/// when there is none or it is unusable.
pub fn load_persisted(
    dir: &std::path::Path,
    workload: &str,
) -> Option<(outrider_config::LoadedPolicy, u64)> {
    let state = match persist::load(dir) {
        Ok(Some(state)) => state,
        Ok(None) => return None,
        Err(error) => {
            tracing::warn!(%error, "ignoring the persisted policy");
            return None;
        }
    };
    if state.workload != workload {
        tracing::warn!(persisted = %state.workload, %workload, "ignoring the persisted policy of another workload");
        return None;
    }
    let file = dir.join(persist::FILE_NAME).display().to_string();
    match outrider_config::load(&file, &state.policy) {
        Ok(loaded) if loaded.content_hash == state.content_hash => Some((loaded, state.version)),
        Ok(_) => {
            tracing::warn!(file = %file, "ignoring the persisted policy: its hash does not match");
            None
        }
        Err(error) => {
            tracing::warn!(%error, "ignoring the persisted policy: invalid");
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_is_capped_full_jitter() {
        let mut backoff = Backoff::new(BACKOFF_BASE, BACKOFF_MAX);
        let caps: Vec<u64> = (0..10)
            .map(|_| {
                let cap = backoff.cap();
                let delay = backoff.next_delay();
                assert!(delay <= cap, "{delay:?} > {cap:?}");
                u64::try_from(cap.as_millis()).unwrap_or(u64::MAX)
            })
            .collect();
        assert_eq!(
            caps,
            [100, 200, 400, 800, 1600, 3200, 6400, 10_000, 10_000, 10_000]
        );
        for _ in 0..100 {
            assert!(backoff.next_delay() <= BACKOFF_MAX);
        }
        backoff.reset();
        assert_eq!(backoff.cap(), BACKOFF_BASE);
    }

    #[test]
    fn backoff_spreads_delays() {
        // Full jitter: many draws at one cap are not all equal.
        let draws: std::collections::BTreeSet<Duration> = (0..50)
            .map(|_| Backoff::new(Duration::from_secs(10), BACKOFF_MAX).next_delay())
            .collect();
        assert!(draws.len() > 10, "{draws:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn attempts_back_off_and_a_connection_resets_the_backoff() {
        use std::sync::atomic::{AtomicUsize, Ordering};
        use std::sync::Mutex;
        const SEED: u64 = 7;
        let calls = AtomicUsize::new(0);
        let at = Mutex::new(Vec::new());
        let started = tokio::time::Instant::now();
        // Attempts 1-3 fail to connect, 4 connects then breaks, 5-6 fail again.
        let session = || {
            let n = calls.fetch_add(1, Ordering::SeqCst) + 1;
            at.lock().expect("lock").push(started.elapsed());
            async move {
                Attempt {
                    replica: None,
                    connected: n == 4,
                    result: Err(SessionError::Closed),
                }
            }
        };
        let backoff =
            |seed| Backoff::with_rng(BACKOFF_BASE, BACKOFF_MAX, fastrand::Rng::with_seed(seed));
        reconnect_loop(backoff(SEED), session, || calls.load(Ordering::SeqCst) >= 6).await;

        // The same seed replayed: delays drawn under caps 100, 200, 400 ms; reset; 100, 200.
        let mut replay = backoff(SEED);
        let mut expected = vec![Duration::ZERO];
        let mut t = Duration::ZERO;
        for i in 1..6 {
            if i == 4 {
                replay.reset();
            }
            let cap = replay.cap();
            let delay = replay.next_delay();
            assert!(delay <= cap);
            t += delay;
            expected.push(t);
        }
        assert_eq!(*at.lock().expect("lock"), expected);
        // The fifth attempt waited under the first cap again, not under 800 ms.
        let gaps: Vec<Duration> = expected.windows(2).map(|w| w[1] - w[0]).collect();
        assert!(gaps[3] <= BACKOFF_BASE, "{gaps:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn each_attempt_goes_to_the_next_replica_with_the_backoff_between() {
        use std::sync::Mutex;
        const SEED: u64 = 11;
        let replicas = Replicas::parse(&[
            "http://127.0.0.1:1",
            "http://127.0.0.1:2",
            "http://127.0.0.1:3",
        ])
        .expect("valid")
        .resolve()
        .await
        .expect("resolved");
        let rotation = Mutex::new(Rotation::default());
        let tried = Mutex::new(Vec::new());
        let started = tokio::time::Instant::now();
        // Replica 1 takes the subscription and loses it (killed); 2 is down (refused); 3
        // takes it and loses it too.
        let session = || {
            let replica = rotation
                .lock()
                .expect("lock")
                .next(&replicas)
                .expect("a replica");
            let port = replica.address.port();
            tried.lock().expect("lock").push((port, started.elapsed()));
            async move {
                Attempt {
                    replica: Some(replica),
                    connected: port != 2,
                    result: Err(SessionError::Closed),
                }
            }
        };
        let backoff = Backoff::with_rng(BACKOFF_BASE, BACKOFF_MAX, fastrand::Rng::with_seed(SEED));
        let stopped = || tried.lock().expect("lock").len() >= 7;
        reconnect_loop(backoff, session, stopped).await;

        let tried = tried.into_inner().expect("lock");
        let ports: Vec<u16> = tried.iter().map(|(port, _)| *port).collect();
        // Never the replica just left: each attempt is the next one round.
        assert_eq!(ports, [1, 2, 3, 1, 2, 3, 1]);
        // The delays are the backoff's: reset by each connected attempt, so the attempt after
        // a lost stream waits under the first cap, and the one after the refusal under the
        // second; the same seed replayed gives the same times.
        let mut replay =
            Backoff::with_rng(BACKOFF_BASE, BACKOFF_MAX, fastrand::Rng::with_seed(SEED));
        let mut at = Duration::ZERO;
        let mut expected = vec![(1, at)];
        for (i, port) in ports.iter().enumerate().take(6) {
            if *port != 2 {
                replay.reset();
            }
            let cap = replay.cap();
            assert_eq!(
                cap,
                if *port == 2 {
                    BACKOFF_BASE * 2
                } else {
                    BACKOFF_BASE
                }
            );
            at += replay.next_delay();
            expected.push((ports[i + 1], at));
        }
        assert_eq!(tried, expected);
    }

    #[test]
    fn query_values_are_encoded() {
        assert_eq!(encode("host-1/42"), "host-1%2F42");
        assert_eq!(encode("a b&c"), "a%20b%26c");
    }

    /// A body fed through a channel, like a subscription stream.
    struct ChannelBody(tokio::sync::mpsc::Receiver<Bytes>);

    impl Body for ChannelBody {
        type Data = Bytes;
        type Error = hyper::Error;
        fn poll_frame(
            mut self: std::pin::Pin<&mut Self>,
            cx: &mut std::task::Context<'_>,
        ) -> std::task::Poll<Option<Result<http_body::Frame<Bytes>, hyper::Error>>> {
            self.0
                .poll_recv(cx)
                .map(|chunk| chunk.map(|b| Ok(http_body::Frame::data(b))))
        }
    }

    #[tokio::test(start_paused = true)]
    async fn lines_split_across_frames() {
        let (tx, rx) = tokio::sync::mpsc::channel(8);
        let mut lines = Lines::new(ChannelBody(rx), SILENCE_LIMIT);
        for chunk in ["{\"type\":\"heart", "beat\"}\n\n{\"a\"", ":1}\n"] {
            tx.send(Bytes::from(chunk)).await.expect("open");
        }
        assert_eq!(
            &lines.next_line().await.expect("line")[..],
            br#"{"type":"heartbeat"}"#
        );
        assert_eq!(&lines.next_line().await.expect("line")[..], br#"{"a":1}"#);
        drop(tx);
        assert!(matches!(lines.next_line().await, Err(SessionError::Closed)));
    }

    #[tokio::test(start_paused = true)]
    async fn a_line_too_long_is_skipped_and_reported_with_its_version() {
        let (tx, rx) = tokio::sync::mpsc::channel(8);
        let mut lines = Lines::with_limit(ChannelBody(rx), SILENCE_LIMIT, 64);
        let long = format!(
            "{{\"type\":\"update\",\"version\":42,\"policy\":\"{}\"}}",
            "x".repeat(200)
        );
        let (head, tail) = long.split_at(100);
        for chunk in [head.to_string(), format!("{tail}\n{{\"a\":1}}\n")] {
            tx.send(Bytes::from(chunk)).await.expect("open");
        }
        match lines.next_line().await {
            Err(SessionError::TooLong {
                len,
                limit: 64,
                version: Some(42),
            }) => assert_eq!(len, long.len()),
            other => panic!("{other:?}"),
        }
        // The stream goes on after it.
        assert_eq!(&lines.next_line().await.expect("line")[..], br#"{"a":1}"#);
        assert_eq!(update_version(b"{\"type\":\"heartbeat\"}"), None);
    }

    #[tokio::test(start_paused = true)]
    async fn a_silent_stream_fails_after_three_heartbeats() {
        let (tx, rx) = tokio::sync::mpsc::channel(8);
        let mut lines = Lines::new(ChannelBody(rx), SILENCE_LIMIT);
        let started = tokio::time::Instant::now();
        // Heartbeats every period keep it alive...
        let feeder = tokio::spawn(async move {
            for _ in 0..3 {
                tokio::time::sleep(Duration::from_secs(HEARTBEAT_SECS)).await;
                tx.send(Bytes::from_static(b"{\"type\":\"heartbeat\"}\n"))
                    .await
                    .expect("open");
            }
            // ...then silence, with the connection still open.
            tokio::time::sleep(Duration::from_secs(3600)).await;
            drop(tx);
        });
        for _ in 0..3 {
            lines.next_line().await.expect("heartbeat");
        }
        assert_eq!(started.elapsed(), Duration::from_secs(3 * HEARTBEAT_SECS));
        assert!(matches!(
            lines.next_line().await,
            Err(SessionError::Silent(_))
        ));
        assert_eq!(
            started.elapsed(),
            Duration::from_secs(3 * HEARTBEAT_SECS) + SILENCE_LIMIT
        );
        feeder.abort();
    }
}
