//! The control plane's HTTP server: HTTP/1.1 and prior-knowledge HTTP/2 (h2c) on one port.
//! Proxies subscribe and ACK ([`outrider_config::wire`]); `outriderctl` uses the management API
//! ([`crate::api`]). Every endpoint but `/live`, `/ready`, `/metrics` and (from loopback)
//! `/v1/status` needs `Authorization: Bearer <token>`; anything else gets 401 and a log line.

use std::collections::HashMap;
use std::convert::Infallible;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{header, Method, Request, Response, StatusCode};
use http_body::{Body, Frame};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use outrider_config::wire::{self, Ack, CertificateRequest};
use serde::Serialize;
use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch};

use crate::api::{self, ErrorBody};
use crate::ca::Ca;
use crate::discovery::{self, ServiceRegistry};
use crate::engine::{Change, Engine, EngineError, Published};
use crate::metrics::CertFailure;
use crate::replica::Replica;
use crate::service_account::ServiceAccountTokens;
use crate::store::Source;

/// Response body type of every endpoint.
pub type ResBody = BoxBody<Bytes, Infallible>;

/// Largest document `apply` takes.
const MAX_DOCUMENT: usize = 1024 * 1024;
/// Bound on receiving a request head over HTTP/1.1.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// Largest ACK body.
const MAX_ACK: usize = 64 * 1024;
/// Longest client deadline (`timeout_ms`) honoured; a larger one is cut to it.
const MAX_CLIENT_TIMEOUT_MS: u64 = 5 * 60 * 1000;

/// What the server needs: the engine and the token clients must present.
pub struct App {
    /// The control plane's state.
    pub engine: Arc<Engine>,
    /// The shared secret of proxies and operators.
    pub token: String,
    /// Seconds between heartbeats on idle subscriptions.
    pub heartbeat: Duration,
    /// The mesh CA behind `POST /v1/certificate`; `None` answers it with 404.
    pub ca: Option<Arc<Ca>>,
    /// When set, a certificate is issued only for the service account the request's token
    /// proves; otherwise the API token entitles to any identity.
    pub service_accounts: Option<Arc<ServiceAccountTokens>>,
    /// This replica: whether it leads, how current its view is, the other replicas' proxies.
    pub replica: Arc<Replica>,
    /// The services' registered endpoints (`discovery: registry`).
    pub services: Arc<ServiceRegistry>,
}

/// Accepts connections on `listener` forever, each served as HTTP/1.1 or h2c.
pub async fn serve(listener: TcpListener, app: Arc<App>) {
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(e) => {
                // Typically EMFILE: back off instead of spinning while descriptors are short.
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        // Pushes are small and latency matters more than packet count.
        let _ = stream.set_nodelay(true);
        let app = Arc::clone(&app);
        tokio::spawn(async move {
            let service = service_fn(move |req| {
                let app = Arc::clone(&app);
                async move { Ok::<_, Infallible>(handle(req, peer, &app).await) }
            });
            let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
            // A client that never finishes its request head must not hold a descriptor forever.
            builder
                .http1()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(HEADER_READ_TIMEOUT);
            if let Err(e) = builder
                .serve_connection(TokioIo::new(stream), service)
                .await
            {
                tracing::debug!(%peer, error = %e, "connection ended with an error");
            }
        });
    }
}

async fn handle(req: Request<Incoming>, peer: SocketAddr, app: &App) -> Response<ResBody> {
    let path = req.uri().path().to_string();
    let open = match path.as_str() {
        "/live" | "/ready" | "/metrics" | api::SCHEMA_PATH => true,
        // Read-only status, open to the machine itself (an operator on the node).
        api::STATUS_PATH | api::VERSION_PATH => peer.ip().is_loopback(),
        _ => false,
    };
    if !open && !authorized(&req, &app.token) {
        tracing::warn!(%peer, path, "unauthorized request refused");
        let mut res = json(
            StatusCode::UNAUTHORIZED,
            &ErrorBody {
                error: "missing or wrong token".into(),
                kind: None,
            },
        );
        res.headers_mut().insert(
            header::WWW_AUTHENTICATE,
            header::HeaderValue::from_static("Bearer"),
        );
        return res;
    }
    let query = parse_query(req.uri().query().unwrap_or(""));
    match (req.method(), path.as_str()) {
        (&Method::GET, "/live") => text(StatusCode::OK, "ok\n"),
        (&Method::GET, "/ready") => ready(&app.engine, &app.replica),
        (&Method::GET, "/metrics") => metrics(app),
        (&Method::GET, wire::SUBSCRIBE_PATH) => subscribe(req.headers(), &query, peer, app).await,
        (&Method::POST, wire::ACK_PATH) => ack(req, app).await,
        (&Method::POST, wire::CERTIFICATE_PATH) => certificate(req, peer, app).await,
        (&Method::POST, wire::REGISTER_PATH) => register(req, app).await,
        (&Method::POST, wire::DEREGISTER_PATH) => deregister(req, app).await,
        (&Method::POST, api::APPLY_PATH) => apply(req, &query, app).await,
        (&Method::GET, api::HISTORY_PATH) => json(StatusCode::OK, &app.engine.history()),
        (&Method::POST, api::ROLLBACK_PATH) => rollback(&query, app).await,
        (&Method::POST, api::DELETE_PATH) => delete(&query, app).await,
        (&Method::GET, api::POLICY_PATH) => match query.get("workload") {
            Some(w) if valid_workload(w) => json(StatusCode::OK, &app.engine.policy(w)),
            _ => error(StatusCode::BAD_REQUEST, "`workload` query parameter needed"),
        },
        (&Method::GET, api::STATUS_PATH) => {
            let mut status = app.engine.status();
            status.certificates = app.ca.as_ref().map(|ca| ca.status());
            let mut replica = app.replica.status();
            let local = std::mem::take(&mut status.proxies);
            status.proxies = app.replica.all_proxies(local, &mut replica).await;
            status.replica = Some(replica);
            json(StatusCode::OK, &status)
        }
        (&Method::GET, api::SCHEMA_PATH) => schema(),
        (&Method::GET, api::VERSION_PATH) => json(
            StatusCode::OK,
            &api::ServerVersion {
                version: env!("CARGO_PKG_VERSION").to_string(),
                now_ms: api::now_ms(),
            },
        ),
        (
            _,
            "/live"
            | "/ready"
            | "/metrics"
            | wire::SUBSCRIBE_PATH
            | wire::ACK_PATH
            | wire::CERTIFICATE_PATH
            | wire::REGISTER_PATH
            | wire::DEREGISTER_PATH
            | api::APPLY_PATH
            | api::HISTORY_PATH
            | api::ROLLBACK_PATH
            | api::DELETE_PATH
            | api::POLICY_PATH
            | api::STATUS_PATH
            | api::VERSION_PATH
            | api::SCHEMA_PATH,
        ) => error(StatusCode::METHOD_NOT_ALLOWED, "method not allowed"),
        _ => error(StatusCode::NOT_FOUND, "no such endpoint"),
    }
}

/// 200 even while the state directory fails: the control plane still serves the version in
/// force to proxies and issues certificates, which a readiness probe taking it out of its
/// Service would stop. The body says what is wrong, and, with replicas on etcd, whether this
/// one leads and whether its view is stale.
fn ready(engine: &Engine, replica: &Replica) -> Response<ResBody> {
    let store = engine.store_status();
    let mut body = String::from("ok");
    if let Some(error) = &store.error {
        let since = store
            .failing_since_ms
            .map_or_else(String::new, api::format_utc);
        let _ = write!(
            body,
            " store=failing dir={:?} failing_since={since} error={error:?}",
            store.dir
        );
    }
    if let Some(pending) = &store.pending {
        let _ = write!(body, " pending={pending:?}");
    }
    if let Some(details) = replica.ready_details() {
        body.push_str(&details);
    }
    body.push('\n');
    let mut res = Response::new(Full::new(Bytes::from(body)).boxed());
    res.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    res
}

/// The policy's JSON Schema, generated from the policy types once per process.
fn schema() -> Response<ResBody> {
    static SCHEMA: std::sync::OnceLock<Bytes> = std::sync::OnceLock::new();
    let body = SCHEMA.get_or_init(|| Bytes::from(outrider_config::policy_schema_text()));
    let mut res = Response::new(Full::new(body.clone()).boxed());
    res.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/schema+json"),
    );
    res
}

/// The control plane's own metrics, in the Prometheus text format ([`crate::metrics`]).
fn metrics(app: &App) -> Response<ResBody> {
    let body = crate::metrics::encode(
        &app.engine,
        &app.services,
        app.ca.as_ref().map(|ca| ca.not_after()),
    );
    let mut res = Response::new(Full::new(Bytes::from(body)).boxed());
    res.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
    );
    res
}

/// Streams a workload's policy. With service-account binding on, the request's
/// service-account token decides the workload: its service account's name.
async fn subscribe(
    headers: &header::HeaderMap,
    query: &HashMap<String, String>,
    peer: SocketAddr,
    app: &App,
) -> Response<ResBody> {
    let Some(workload) = query.get("workload").filter(|w| valid_workload(w)) else {
        return error(
            StatusCode::BAD_REQUEST,
            "`workload` query parameter needed (letters, digits, '-', '.', '_')",
        );
    };
    if let Some(service_accounts) = &app.service_accounts {
        let sa_token = headers
            .get(wire::SERVICE_ACCOUNT_TOKEN_HEADER)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        // Signature checks are CPU work: off the reactor.
        let service_accounts = Arc::clone(service_accounts);
        let asked = workload.clone();
        let checked = tokio::task::spawn_blocking(move || {
            service_accounts.check_workload(sa_token.as_deref(), &asked)
        })
        .await;
        match checked {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => {
                tracing::warn!(%peer, %workload, error = %e, "subscription refused");
                return error(StatusCode::FORBIDDEN, &e.to_string());
            }
            Err(e) => {
                return error(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    &format!("token check failed: {e}"),
                )
            }
        }
    }
    let proxy = query
        .get("proxy")
        .cloned()
        .unwrap_or_else(|| peer.to_string());
    let have_hash = query.get("have_hash").filter(|h| !h.is_empty()).cloned();
    // The version the proxy runs: a replica whose view is older waits for it (see `run`).
    let have_version = query
        .get("have_version")
        .and_then(|v| v.parse::<u64>().ok());
    let claimed = query.get("session").map(String::as_str);
    let session = match app.engine.connect(&proxy, workload, Some(peer), claimed) {
        Ok(session) => session,
        Err(e) => return error(StatusCode::CONFLICT, &e.to_string()),
    };
    let updates = app.engine.subscribe(workload);
    // Only a subscriber that says it reads endpoint messages is sent them.
    let endpoints = (query.get(wire::ENDPOINTS_QUERY).map(String::as_str) == Some("1"))
        .then(|| (app.services.subscribe(), app.services.warm_at()));
    let unselected = updates.borrow().unselected;
    let (tx, rx) = mpsc::channel(2);
    let stream = Stream {
        engine: Arc::clone(&app.engine),
        proxy,
        connection: session.connection,
    };
    tokio::spawn(stream.run(
        updates,
        endpoints,
        tx,
        have_hash.map(|h| (h, unselected)),
        have_version,
        app.heartbeat,
    ));
    let mut res = Response::new(ChannelBody(rx).boxed());
    let headers = res.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/x-ndjson"),
    );
    headers.insert(
        header::CACHE_CONTROL,
        header::HeaderValue::from_static("no-store"),
    );
    if let Ok(id) = header::HeaderValue::from_str(&session.id) {
        headers.insert(wire::SESSION_HEADER, id);
    }
    if unselected {
        headers.insert(
            wire::UNSELECTED_HEADER,
            header::HeaderValue::from_static("1"),
        );
    }
    res
}

/// Longest a subscription waits for this replica's view to reach the version its proxy runs
/// before pushing the view's own: an etcd watch lags by milliseconds; ten seconds is the
/// default `--view-stale-after`, past which the replica's view counts as stale anyway.
const RESUME_WAIT: Duration = Duration::from_secs(10);

/// One proxy's subscription; marks the proxy disconnected when dropped.
struct Stream {
    engine: Arc<Engine>,
    proxy: String,
    connection: u64,
}

impl Stream {
    async fn run(
        self,
        mut updates: watch::Receiver<Arc<Published>>,
        mut endpoints: Option<(watch::Receiver<Arc<discovery::View>>, tokio::time::Instant)>,
        tx: mpsc::Sender<Bytes>,
        mut sent: Option<(String, bool)>,
        have_version: Option<u64>,
        heartbeat: Duration,
    ) {
        static HEARTBEAT: &[u8] = b"{\"type\":\"heartbeat\"}\n";
        // A proxy failing over from another replica may run a newer version than this
        // replica's view holds yet (its etcd watch lags by a moment): pushing the view's older
        // version would take the proxy back in time (routes it no longer has: 404s). Nothing
        // is pushed until the view reaches the proxy's version, for at most RESUME_WAIT; past
        // it this replica's view is what there is (a store restored from a backup), and it is
        // pushed.
        let mut ahead_until =
            have_version.map(|version| (version, tokio::time::Instant::now() + RESUME_WAIT));
        let mut ticker =
            tokio::time::interval_at(tokio::time::Instant::now() + heartbeat, heartbeat);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // A proxy resuming with the content in force is not sent it again, but it counts
        // as sent: its ACK of what it runs is then accepted.
        let mut counted = {
            let current = updates.borrow();
            let resumed =
                sent.as_ref().map(|(h, _)| h.as_str()) == Some(current.content_hash.as_str());
            if resumed {
                self.engine.sent(
                    &self.proxy,
                    self.connection,
                    current.version,
                    &current.content_hash,
                );
            }
            resumed
        };
        let mut endpoints_sent = discovery::Sent::default();
        loop {
            let current = Arc::clone(&updates.borrow_and_update());
            if let Some((version, _)) = ahead_until {
                if current.version == version {
                    // The view holds the version the proxy runs now: whether a document names
                    // its workload is read from it, not from the lagging view the subscription
                    // began with (where the document may not have been yet).
                    if let Some((hash, unselected)) = sent.as_mut() {
                        if *hash == current.content_hash {
                            *unselected = current.unselected;
                            if !std::mem::replace(&mut counted, true) {
                                self.engine.sent(
                                    &self.proxy,
                                    self.connection,
                                    current.version,
                                    &current.content_hash,
                                );
                            }
                        }
                    }
                }
            }
            // A proxy that already has this content (it said so when reconnecting) is not
            // sent it again: a control-plane restart causes no re-push storm. A change of
            // whether a document names the workload alone is sent.
            let same = sent.as_ref().is_some_and(|(hash, unselected)| {
                *hash == current.content_hash && *unselected == current.unselected
            });
            if let Some((version, until)) = ahead_until {
                if current.version >= version || tokio::time::Instant::now() >= until {
                    ahead_until = None;
                } else if !same {
                    tracing::info!(proxy = %self.proxy, proxy_version = version, view_version = current.version, "proxy runs a newer version than this replica's view; waiting for the view");
                }
            }
            let behind = ahead_until.is_some();
            if !same && !behind {
                // Recorded first, so whoever reads the line can already see it in status.
                self.engine.sent(
                    &self.proxy,
                    self.connection,
                    current.version,
                    &current.content_hash,
                );
                if tx.send(current.line.clone()).await.is_err() {
                    return;
                }
                sent = Some((current.content_hash.clone(), current.unselected));
                ticker.reset();
            }
            // After the policy that names the services: endpoints of the registry services it
            // has, those that changed since last sent (all of them on a new stream).
            // Not before the registry is warm: the proxy keeps the endpoints it has meanwhile.
            let warm_at = endpoints.as_ref().map(|(_, warm_at)| *warm_at);
            let warm = warm_at.is_some_and(|at| tokio::time::Instant::now() >= at);
            if let (Some((endpoints, _)), true) = (endpoints.as_mut(), warm) {
                let view = Arc::clone(&endpoints.borrow_and_update());
                for line in endpoints_sent.due(&current.registry_services, &view) {
                    if tx.send(line).await.is_err() {
                        return;
                    }
                    ticker.reset();
                }
            }
            let endpoints_changed = async {
                match (endpoints.as_mut(), warm_at) {
                    (Some((endpoints, _)), _) if warm => endpoints.changed().await,
                    (Some(_), Some(at)) => {
                        tokio::time::sleep_until(at).await;
                        Ok(())
                    }
                    _ => std::future::pending().await,
                }
            };
            let resume_wait_over = async {
                match ahead_until {
                    Some((_, until)) => tokio::time::sleep_until(until).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                changed = updates.changed() => if changed.is_err() { return },
                changed = endpoints_changed => if changed.is_err() { return },
                () = resume_wait_over => {}
                _ = ticker.tick() => if tx.send(Bytes::from_static(HEARTBEAT)).await.is_err() { return },
                () = tx.closed() => return,
            }
        }
    }
}

impl Drop for Stream {
    fn drop(&mut self) {
        self.engine.disconnected(&self.proxy, self.connection);
    }
}

/// A response body fed by a channel: ends when the sender is dropped; dropping it (the client
/// went away) closes the channel, which ends the subscription task.
struct ChannelBody(mpsc::Receiver<Bytes>);

impl Body for ChannelBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        self.0.poll_recv(cx).map(|b| b.map(|b| Ok(Frame::data(b))))
    }
}

async fn ack(req: Request<Incoming>, app: &App) -> Response<ResBody> {
    let body = match read_body(req, MAX_ACK).await {
        Ok(body) => body,
        Err(res) => return res,
    };
    match serde_json::from_slice::<Ack>(&body) {
        Ok(ack) => match app.engine.ack(ack) {
            Ok(()) => Response::builder()
                .status(StatusCode::NO_CONTENT)
                .body(empty())
                .unwrap_or_default(),
            Err(e) => error(StatusCode::CONFLICT, &e.to_string()),
        },
        Err(e) => error(StatusCode::BAD_REQUEST, &format!("not an ACK: {e}")),
    }
}

/// Registers (or renews) a proxy's workload as an endpoint of services; answers the TTL.
/// With service-account binding on, only as its own workload: each service registered must
/// be the name of the service account the request's token proves, as a subscription's
/// workload must, so a holder of the control-plane token cannot register another workload's
/// service.
async fn register(req: Request<Incoming>, app: &App) -> Response<ResBody> {
    let sa_token = req
        .headers()
        .get(wire::SERVICE_ACCOUNT_TOKEN_HEADER)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let body = match read_body(req, MAX_ACK).await {
        Ok(body) => body,
        Err(res) => return res,
    };
    let registration = match serde_json::from_slice::<wire::Registration>(&body) {
        Ok(registration) => registration,
        Err(e) => return error(StatusCode::BAD_REQUEST, &format!("not a registration: {e}")),
    };
    if let Some(service_accounts) = &app.service_accounts {
        // Signature checks are CPU work: off the reactor.
        let service_accounts = Arc::clone(service_accounts);
        let services = registration.services.clone();
        let checked = tokio::task::spawn_blocking(move || {
            services.iter().try_for_each(|service| {
                service_accounts
                    .check_workload(sa_token.as_deref(), service)
                    .map(drop)
            })
        })
        .await;
        match checked {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                tracing::warn!(proxy = %registration.proxy, services = ?registration.services, error = %e, "registration refused");
                return error(StatusCode::FORBIDDEN, &format!("registration refused: {e}"));
            }
            Err(e) => {
                return error(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    &format!("token check failed: {e}"),
                )
            }
        }
    }
    match app.services.register(registration) {
        Ok(()) => json(
            StatusCode::OK,
            &wire::RegistrationLease {
                ttl_ms: u64::try_from(app.services.ttl().as_millis()).unwrap_or(u64::MAX),
            },
        ),
        Err(e @ discovery::RegistrationError::Full) => {
            error(StatusCode::SERVICE_UNAVAILABLE, &e.to_string())
        }
        Err(e) => error(StatusCode::BAD_REQUEST, &e.to_string()),
    }
}

/// Removes a proxy's registration at once (it drains).
async fn deregister(req: Request<Incoming>, app: &App) -> Response<ResBody> {
    let body = match read_body(req, MAX_ACK).await {
        Ok(body) => body,
        Err(res) => return res,
    };
    match serde_json::from_slice::<wire::Deregistration>(&body) {
        Ok(d) => {
            discovery::deregister_everywhere(&app.services, &app.replica, &d.proxy).await;
            Response::builder()
                .status(StatusCode::NO_CONTENT)
                .body(empty())
                .unwrap_or_default()
        }
        Err(e) => error(
            StatusCode::BAD_REQUEST,
            &format!("not a deregistration: {e}"),
        ),
    }
}

/// Issues a workload certificate. The API token was checked already; with service-account
/// binding on, the request's service-account token must prove the identity asked for.
async fn certificate(req: Request<Incoming>, peer: SocketAddr, app: &App) -> Response<ResBody> {
    let Some(ca) = &app.ca else {
        return error(StatusCode::NOT_FOUND, "this control plane runs no CA");
    };
    let sa_token = req
        .headers()
        .get(wire::SERVICE_ACCOUNT_TOKEN_HEADER)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let failed = |reason| app.engine.metrics().certificate_failed(reason);
    let body = match read_body(req, MAX_ACK).await {
        Ok(body) => body,
        Err(res) => {
            failed(CertFailure::Malformed);
            return res;
        }
    };
    let request: CertificateRequest = match serde_json::from_slice(&body) {
        Ok(request) => request,
        Err(e) => {
            failed(CertFailure::Malformed);
            return error(
                StatusCode::BAD_REQUEST,
                &format!("not a certificate request: {e}"),
            );
        }
    };
    if let Some(service_accounts) = &app.service_accounts {
        // Signature checks are CPU work: off the reactor.
        let service_accounts = Arc::clone(service_accounts);
        let (namespace, name) = (request.namespace.clone(), request.service_account.clone());
        let checked = tokio::task::spawn_blocking(move || {
            service_accounts.check(sa_token.as_deref(), &namespace, &name)
        })
        .await;
        match checked {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => {
                failed(CertFailure::Unauthorized);
                tracing::warn!(%peer, namespace = %request.namespace, service_account = %request.service_account, error = %e, "certificate refused");
                return error(StatusCode::FORBIDDEN, &e.to_string());
            }
            Err(e) => {
                failed(CertFailure::Internal);
                return error(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    &format!("token check failed: {e}"),
                );
            }
        }
    }
    match ca.issue(&request) {
        Ok(issued) => {
            app.engine.metrics().certificate_issued();
            tracing::info!(%peer, identity = %issued.identity, not_after = issued.not_after, "certificate issued");
            json(StatusCode::OK, &issued)
        }
        Err(e) => {
            failed(CertFailure::of(&e));
            tracing::warn!(%peer, error = %e, "certificate refused");
            error(StatusCode::BAD_REQUEST, &e.to_string())
        }
    }
}

/// The client's own deadline: past it, it has given up and the change must not happen.
fn client_deadline(query: &HashMap<String, String>) -> Option<std::time::Instant> {
    query
        .get(api::TIMEOUT_PARAM)
        .and_then(|ms| ms.parse::<u64>().ok())
        .map(|ms| std::time::Instant::now() + Duration::from_millis(ms.min(MAX_CLIENT_TIMEOUT_MS)))
}

async fn apply(
    req: Request<Incoming>,
    query: &HashMap<String, String>,
    app: &App,
) -> Response<ResBody> {
    let deadline = client_deadline(query);
    let Some(name) = query.get("name").filter(|n| valid_name(n)).cloned() else {
        return error(
            StatusCode::BAD_REQUEST,
            "`name` query parameter needed (letters, digits, '-', '.', '_')",
        );
    };
    let body = match read_body(req, MAX_DOCUMENT).await {
        Ok(body) => body,
        Err(res) => return res,
    };
    let Ok(text) = String::from_utf8(body.to_vec()) else {
        return error(StatusCode::BAD_REQUEST, "the document is not UTF-8");
    };
    let engine = Arc::clone(&app.engine);
    let change = Change::Upsert {
        name: name.clone(),
        text,
        source: Source::Api,
        force: query
            .get(api::FORCE_PARAM)
            .is_some_and(|v| v == "1" || v == "true"),
    };
    let cause = format!("apply {name}");
    let dry_run = query
        .get("dry_run")
        .is_some_and(|v| v == "1" || v == "true");
    // Validation is quick but the new state is fsynced: off the reactor.
    let result = tokio::task::spawn_blocking(move || {
        if dry_run {
            engine.dry_run(vec![change])
        } else {
            engine.apply_by(vec![change], &cause, deadline)
        }
    })
    .await;
    match result {
        Ok(Ok(outcome)) => match outcome.rejected.first() {
            Some(rejected) => json(StatusCode::UNPROCESSABLE_ENTITY, rejected),
            None => json(StatusCode::OK, &outcome.applied(&name)),
        },
        Ok(Err(e)) => engine_error(&e),
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, &e.to_string()),
    }
}

async fn rollback(query: &HashMap<String, String>, app: &App) -> Response<ResBody> {
    let Some(to) = query.get("to").and_then(|t| t.parse::<u64>().ok()) else {
        return error(
            StatusCode::BAD_REQUEST,
            "`to` query parameter needed (a version)",
        );
    };
    let engine = Arc::clone(&app.engine);
    match tokio::task::spawn_blocking(move || engine.rollback(to)).await {
        Ok(Ok(outcome)) => json(StatusCode::OK, &outcome.applied("")),
        Ok(Err(e)) => engine_error(&e),
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, &e.to_string()),
    }
}

async fn delete(query: &HashMap<String, String>, app: &App) -> Response<ResBody> {
    let deadline = client_deadline(query);
    let Some(name) = query.get("name").filter(|n| valid_name(n)).cloned() else {
        return error(
            StatusCode::BAD_REQUEST,
            "`name` query parameter needed (letters, digits, '-', '.', '_')",
        );
    };
    let engine = Arc::clone(&app.engine);
    // The new state is fsynced: off the reactor.
    match tokio::task::spawn_blocking(move || engine.delete(&name, deadline)).await {
        Ok(Ok(outcome)) => match outcome.rejected.first() {
            Some(rejected) => json(StatusCode::UNPROCESSABLE_ENTITY, rejected),
            None => json(StatusCode::OK, &outcome.applied("")),
        },
        Ok(Err(e)) => engine_error(&e),
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, &e.to_string()),
    }
}

fn engine_error(e: &EngineError) -> Response<ResBody> {
    let status = match e {
        EngineError::NotKept(_) | EngineError::UnknownDocument(_) => StatusCode::NOT_FOUND,
        EngineError::FileBacked(_) | EngineError::OverridesFile(_) => StatusCode::CONFLICT,
        EngineError::Expired | EngineError::Contended | EngineError::NotLeader => {
            StatusCode::SERVICE_UNAVAILABLE
        }
        EngineError::Unavailable(_) => {
            tracing::warn!(error = %e, "change refused");
            return json(
                StatusCode::SERVICE_UNAVAILABLE,
                &ErrorBody {
                    error: e.to_string(),
                    kind: Some(crate::api::STORE_UNAVAILABLE.to_string()),
                },
            );
        }
        // Temporary by nature (a full or read-only disk), and not the request's fault: the
        // client is told nothing changed (the CLI exits 74).
        EngineError::Store { .. } => {
            tracing::error!(error = %e, "change failed");
            StatusCode::INSUFFICIENT_STORAGE
        }
        EngineError::Load(_) | EngineError::Stored { .. } | EngineError::Conflict => {
            tracing::error!(error = %e, "change failed");
            StatusCode::INTERNAL_SERVER_ERROR
        }
    };
    error(status, &e.to_string())
}

async fn read_body(req: Request<Incoming>, limit: usize) -> Result<Bytes, Response<ResBody>> {
    match Limited::new(req.into_body(), limit).collect().await {
        Ok(collected) => Ok(collected.to_bytes()),
        Err(e) => Err(error(
            StatusCode::PAYLOAD_TOO_LARGE,
            &format!("cannot read the body (at most {limit} bytes): {e}"),
        )),
    }
}

/// Compares the bearer token without an early exit on the first differing byte, so response
/// timing does not reveal how much of a guess was right.
fn authorized(req: &Request<Incoming>, token: &str) -> bool {
    let Some(given) = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.as_bytes().strip_prefix(b"Bearer "))
    else {
        return false;
    };
    given.len() == token.len()
        && given
            .iter()
            .zip(token.as_bytes())
            .fold(0u8, |acc, (a, b)| acc | (a ^ b))
            == 0
}

fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 253
        && !name.starts_with('.')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_'))
}

fn valid_workload(name: &str) -> bool {
    name == crate::engine::DEFAULTS || valid_name(name)
}

/// `a=1&b=x%20y` into a map (last value wins).
fn parse_query(query: &str) -> HashMap<String, String> {
    query
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|pair| {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            (percent_decode(k), percent_decode(v))
        })
        .collect()
}

/// A query-string component: `+` is a space (form encoding, which `percent-encoding` leaves
/// alone; `%2B` still decodes to `+`), invalid `%` sequences stay as they are.
fn percent_decode(s: &str) -> String {
    let spaced = s.replace('+', " ");
    percent_encoding::percent_decode_str(&spaced)
        .decode_utf8_lossy()
        .into_owned()
}

fn empty() -> ResBody {
    Full::new(Bytes::new()).boxed()
}

fn text(status: StatusCode, body: &'static str) -> Response<ResBody> {
    let mut res = Response::new(Full::new(Bytes::from_static(body.as_bytes())).boxed());
    *res.status_mut() = status;
    res
}

fn json<T: Serialize>(status: StatusCode, value: &T) -> Response<ResBody> {
    let body = serde_json::to_vec(value).unwrap_or_default();
    let mut res = Response::new(Full::new(Bytes::from(body)).boxed());
    *res.status_mut() = status;
    res.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/json"),
    );
    res
}

fn error(status: StatusCode, message: &str) -> Response<ResBody> {
    json(
        status,
        &ErrorBody {
            error: message.to_string(),
            kind: None,
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_is_decoded() {
        let q = parse_query("workload=check-out&proxy=pod%2F1&have_hash=&x");
        assert_eq!(q["workload"], "check-out");
        assert_eq!(q["proxy"], "pod/1");
        assert_eq!(q["have_hash"], "");
        assert_eq!(q["x"], "");
        assert_eq!(percent_decode("a%zz%4"), "a%zz%4");
        assert_eq!(percent_decode("a+b%2Bc%20d"), "a b+c d");
    }
}
