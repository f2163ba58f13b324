//! Connections brought to a listener by transparent capture (their original destination is
//! not the listener): what they are and where they go. Outbound, the first bytes are detected
//! (unless the port is in `opaque_ports`): HTTP is served at L7 with the destination's service
//! policy (or passed through), everything else is relayed as opaque TCP to the original
//! destination (wrapped in mesh mTLS, ALPN `outrider-tcp/1`, when it belongs to a meshed
//! service). Inbound, a ClientHello offering an Outrider ALPN id is mesh mTLS, terminated here
//! (`outrider-tcp/1`: its plaintext relayed to the app's port); an app's own TLS and other
//! plaintext are relayed untouched (refused under `strict`).
//! Requests are then routed per connection by [`Capture`], re-resolved only after a reload.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use bytes::{Bytes, BytesMut};
use http::HeaderValue;
use outrider_config::{InboundMtls, Protocol};
use tokio::net::TcpStream;
use tokio::sync::watch;

use crate::http::shared::Shared;
use crate::http::snapshot::{Snapshot, Target, INBOUND, OUTBOUND, PASSTHROUGH};
use crate::io::connection::{ConnectionSlot, LogLimiter};
use crate::io::detect::{self, Detection};
use crate::io::opaque;
use crate::io::original_dst::LoopKind;
use crate::io::rewind::Rewind;
use crate::io::tls;
use crate::telemetry::metrics::Metrics;

/// The `destination` label of captured inbound connections.
const APP: &str = "app";

/// A captured connection to be served at L7.
pub struct Http {
    /// The stream (plaintext, or mesh TLS terminated).
    pub io: tls::Io,
    /// Bytes read already (detection), to be read again first.
    pub bytes: BytesMut,
    /// The verified caller (inbound mesh TLS).
    pub peer_identity: Option<HeaderValue>,
    /// Where it was going.
    pub dst: SocketAddr,
    /// It came to the inbound listener.
    pub inbound: bool,
    /// Its listener slot, held while it lives.
    pub slot: ConnectionSlot,
}

/// Decides what the captured connection `stream` (from `peer`, going to `dst`) is, and serves
/// it unless it is HTTP: `Some` is to be served at L7; `None` when it has been relayed, refused
/// or closed.
pub async fn accept(
    stream: TcpStream,
    peer: SocketAddr,
    dst: SocketAddr,
    inbound: bool,
    shared: &Arc<Shared>,
    slot: ConnectionSlot,
    stop: &mut watch::Receiver<bool>,
) -> Option<Http> {
    crate::io::original_dst::OwnSockets::global().activate();
    let snapshot = shared.snapshot.load_full();
    let direction = if inbound { INBOUND } else { OUTBOUND };
    let capture = &shared.metrics.capture;
    let mut stream = stream;
    // Inbound with a mesh identity, opaque ports are detected too: a sidecar's mesh-wrapped
    // stream opens with its ClientHello, which must be told from the plaintext protocol.
    let detect_opaque_port = inbound && shared.mesh.is_some();
    let relayed = Relayed {
        shared,
        snapshot: &snapshot,
        peer,
        dst,
        inbound,
    };
    if !detect_opaque_port && snapshot.policy.opaque_ports().contains(&dst.port()) {
        capture.detected(direction, "opaque_port", 0.0);
        // Nothing was read to give the proxy's own connect time to be recorded: a scheduler
        // turn does.
        tokio::task::yield_now().await;
        if refused_as_loop(shared, peer, dst) {
            return None;
        }
        relayed.relay(stream, Bytes::new(), None, true, slot).await;
        return None;
    }
    let timeout = shared.connections.timeouts.detect;
    let Detection {
        protocol,
        bytes,
        elapsed,
    } = tokio::select! {
        detection = detect::detect(&mut stream, timeout) => detection,
        () = crate::core::shutdown::stopped(stop) => return None,
    };
    capture.detected(direction, protocol.label(), elapsed.as_secs_f64());
    if refused_as_loop(shared, peer, dst) {
        return None;
    }
    let http = |io, bytes, peer_identity, slot| {
        Some(Http {
            io,
            bytes,
            peer_identity,
            dst,
            inbound,
            slot,
        })
    };
    match protocol {
        detect::Protocol::Closed => None,
        detect::Protocol::Tls(hello) if inbound && hello.mesh_tcp => {
            let Some(mesh) = &shared.mesh else {
                capture.refused(INBOUND, "no_identity");
                tracing::warn!(%peer, %dst, "mesh TLS connection refused: this proxy has no workload identity (--service-account)");
                return None;
            };
            let deadline =
                crate::io::connection::deadline_after(shared.connections.timeouts.header_read);
            let rewound = Rewind::new(bytes.freeze(), stream);
            let accepted = tls::handshake(rewound, peer, mesh, deadline).await?;
            relay_wrapped(accepted, peer, Some(dst), shared, slot).await;
            None
        }
        detect::Protocol::Tls(hello) if inbound && hello.mesh => {
            let Some(mesh) = &shared.mesh else {
                capture.refused(INBOUND, "no_identity");
                tracing::warn!(%peer, %dst, "mesh TLS connection refused: this proxy has no workload identity (--service-account)");
                return None;
            };
            let deadline =
                crate::io::connection::deadline_after(shared.connections.timeouts.header_read);
            let rewound = Rewind::new(bytes.freeze(), stream);
            let accepted = tls::handshake(rewound, peer, mesh, deadline).await?;
            capture.connection(direction, APP, "http");
            http(accepted.io, BytesMut::new(), accepted.peer_identity, slot)
        }
        // An app's own HTTP proxy (its `HTTP_PROXY`) is the original destination: its CONNECT
        // tunnels are that proxy's to serve, as they are.
        detect::Protocol::Http1 if !inbound && bytes.starts_with(b"CONNECT ") => {
            relayed
                .relay(stream, bytes.freeze(), None, false, slot)
                .await;
            None
        }
        detect::Protocol::Http1 | detect::Protocol::Http2 => {
            // `authorization` answers plaintext HTTP requests 403, one by one.
            if inbound && !inbound_takes_unverified(shared, &snapshot, peer, dst, true) {
                return None;
            }
            let class = destination_class(&snapshot, dst, None, inbound);
            capture.connection(direction, &class, "http");
            http(tls::Io::Plain(stream), bytes, None, slot)
        }
        detect::Protocol::Tls(hello) => {
            let sni = hello.sni.as_deref();
            relayed.relay(stream, bytes.freeze(), sni, true, slot).await;
            None
        }
        detect::Protocol::Opaque | detect::Protocol::TimedOut => {
            relayed
                .relay(stream, bytes.freeze(), None, true, slot)
                .await;
            None
        }
    }
}

/// A captured connection that is relayed as opaque TCP rather than served here: what decides
/// whether and how.
struct Relayed<'a> {
    shared: &'a Shared,
    snapshot: &'a Snapshot,
    peer: SocketAddr,
    dst: SocketAddr,
    inbound: bool,
}

impl Relayed<'_> {
    /// Relays `stream` (after `prefix`) to the original destination: inbound only if it may
    /// reach the app unverified; counted under the destination's class (by `sni` when the
    /// address names no service); wrapped in mesh mTLS when `may_wrap` and the destination is
    /// a meshed service.
    async fn relay(
        &self,
        stream: TcpStream,
        prefix: Bytes,
        sni: Option<&str>,
        may_wrap: bool,
        slot: ConnectionSlot,
    ) {
        let Self {
            shared,
            snapshot,
            peer,
            dst,
            inbound,
        } = *self;
        if inbound && !inbound_takes_unverified(shared, snapshot, peer, dst, false) {
            return;
        }
        let class = destination_class(snapshot, dst, sni, inbound);
        if let Some(sni) = sni {
            tracing::debug!(%dst, sni, destination = %class, "captured TLS relayed as opaque TCP");
        }
        let wrap = may_wrap
            .then(|| mesh_wrapping(snapshot, dst, inbound))
            .flatten();
        let direction = if inbound { INBOUND } else { OUTBOUND };
        let capture = &shared.metrics.capture;
        let mode = if wrap.is_some() {
            OPAQUE_MESH
        } else {
            "opaque"
        };
        capture.connection(direction, &class, mode);
        let connect_timeout = if direction == INBOUND {
            inbound_connect_timeout(shared)
        } else {
            crate::http::snapshot::PASSTHROUGH_CONNECT_TIMEOUT
        };
        let (server, _own) = match opaque::dial(dst, connect_timeout).await {
            Ok(connected) => connected,
            Err(error) => {
                tracing::debug!(%error, direction, "captured connection not relayed");
                return;
            }
        };
        let counters = capture.relay(direction, &class);
        let idle = shared.connections.timeouts.tcp_idle;
        let end = match &wrap {
            None => opaque::relay(stream, server, &prefix, idle, &counters).await,
            Some(wrap) => match tls::connect_opaque(wrap, dst, server).await {
                Ok(server) => opaque::relay(stream, server, &prefix, idle, &counters).await,
                Err(error) => {
                    tracing::debug!(%dst, reason = error.reason, error = %error.message, "captured connection not wrapped in mesh TLS; closed");
                    return;
                }
            },
        };
        tracing::debug!(%dst, direction, destination = %class, end = end.as_str(), "opaque relay ended");
        drop(slot);
    }
}

/// Whether the connection comes from one of the proxy's own sockets (see
/// [`crate::io::original_dst::OwnSockets`]): then it is counted, logged (at most once a second)
/// and refused.
fn refused_as_loop(shared: &Shared, peer: SocketAddr, dst: SocketAddr) -> bool {
    if !crate::io::original_dst::OwnSockets::global().is_own(peer) {
        return false;
    }
    let reason = LoopKind::OwnConnection.label();
    shared.metrics.capture.looped(reason);
    static LOG: Mutex<LogLimiter> = Mutex::new(LogLimiter::new());
    let due = LOG
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .hit(tokio::time::Instant::now());
    if let Some(refused) = due {
        tracing::warn!(
            %peer,
            original_destination = %dst,
            reason,
            refused,
            "captured connection refused: it loops back into this proxy \
             (do the capture rules exclude the proxy's UID?)"
        );
    }
    true
}

/// Whether a captured inbound connection that is not mesh TLS may reach the app: not under
/// `mtls: strict` (or without an identity under it), and not when `authorization` refuses an
/// unauthenticated connection, unless it is `http` (authorized per request).
/// Refusals are logged at debug level and counted.
fn inbound_takes_unverified(
    shared: &Shared,
    snapshot: &Snapshot,
    peer: SocketAddr,
    dst: SocketAddr,
    http: bool,
) -> bool {
    let inbound = snapshot.policy.inbound.as_ref();
    let strict = inbound.is_some_and(|i| i.mtls == InboundMtls::Strict);
    if !strict && (http || authorized(snapshot, None)) {
        return true;
    }
    shared.metrics.capture.refused(INBOUND, "unverified");
    if let Some(mesh) = &shared.mesh {
        mesh.metrics
            .handshake_failed("inbound", "plaintext_refused");
    }
    tracing::debug!(%peer, %dst, strict, "captured inbound connection without mesh TLS refused");
    false
}

/// The metrics class of a destination: its service, the service its TLS server name belongs
/// to, `passthrough`, or `app` inbound.
fn destination_class(
    snapshot: &Snapshot,
    dst: SocketAddr,
    sni: Option<&str>,
    inbound: bool,
) -> Arc<str> {
    if inbound {
        return Arc::from(APP);
    }
    if let Some(target) = snapshot.service_for(dst) {
        return Arc::clone(&target.upstream.spec.name);
    }
    sni.and_then(|host| snapshot.service_for_host(host))
        .cloned()
        .unwrap_or_else(|| Arc::from(PASSTHROUGH))
}

/// The `mode` label of opaque relays wrapped in mesh mTLS (outbound) or unwrapped from it
/// (inbound).
const OPAQUE_MESH: &str = "opaque_mesh";

/// How an outbound opaque relay to `dst` is secured: a destination of a meshed service
/// (`tls: mesh`, or every non-external service under `mesh_tls: strict`) is wrapped in mesh
/// mTLS with that service's config; anything else (and inbound) goes as it is.
fn mesh_wrapping(snapshot: &Snapshot, dst: SocketAddr, inbound: bool) -> Option<tls::UpstreamTls> {
    if inbound {
        return None;
    }
    match snapshot.service_for(dst)?.upstream.spec.tls.as_ref()? {
        // External HTTPS services are the app's own TLS to send as it is.
        tls::UpstreamTls::Origination { .. } | tls::UpstreamTls::Unusable(_) => None,
        meshed => Some(meshed.clone()),
    }
}

/// Whether `inbound.authorization`, when the policy has it, lets an opaque connection from
/// the verified `caller` through (counted as a decision).
fn authorized(snapshot: &Snapshot, caller: Option<&HeaderValue>) -> bool {
    snapshot
        .authorization()
        .is_none_or(|authz| authz.check_connection(caller))
}

/// Serves a terminated mesh-wrapped stream (ALPN `outrider-tcp/1`) from `peer`: its verified
/// caller is checked against `inbound.authorization`, and its plaintext relayed to `dst` (a
/// captured connection's original destination, or `inbound.app` on the explicit inbound port).
/// Without a destination (explicit, and no `inbound` in the policy) it is refused, never read
/// as HTTP.
pub async fn relay_wrapped(
    accepted: tls::Accepted,
    peer: SocketAddr,
    dst: Option<SocketAddr>,
    shared: &Shared,
    slot: ConnectionSlot,
) {
    let capture = &shared.metrics.capture;
    let Some(dst) = dst else {
        capture.refused(INBOUND, "no_destination");
        tracing::warn!(%peer, caller = accepted.peer_identity.as_ref().and_then(|id| id.to_str().ok()), "mesh TCP connection refused: the policy has no `inbound` to relay it to");
        return;
    };
    if !authorized(&shared.snapshot.load(), accepted.peer_identity.as_ref()) {
        capture.refused(INBOUND, "unauthorized");
        tracing::debug!(%peer, %dst, caller = accepted.peer_identity.as_ref().and_then(|id| id.to_str().ok()), "mesh TCP connection refused by authorization");
        return;
    }
    relay_wrapped_inbound(accepted.io, dst, shared, slot).await;
}

/// Relays a terminated mesh-wrapped stream's plaintext to the app's port `dst`.
async fn relay_wrapped_inbound(
    io: tls::Io,
    dst: SocketAddr,
    shared: &Shared,
    slot: ConnectionSlot,
) {
    let capture = &shared.metrics.capture;
    capture.connection(INBOUND, APP, OPAQUE_MESH);
    let connect_timeout = inbound_connect_timeout(shared);
    let (server, _own) = match opaque::dial(dst, connect_timeout).await {
        Ok(connected) => connected,
        Err(error) => {
            tracing::debug!(%error, "mesh TCP connection not relayed to the app");
            return;
        }
    };
    let counters = capture.relay(INBOUND, APP);
    let end = opaque::relay(
        io,
        server,
        &[],
        shared.connections.timeouts.tcp_idle,
        &counters,
    )
    .await;
    tracing::debug!(%dst, end = end.as_str(), "mesh TCP relay ended");
    drop(slot);
}

/// The connect timeout to the app: the policy's inbound one, else the passthrough one.
fn inbound_connect_timeout(shared: &Shared) -> std::time::Duration {
    let snapshot = shared.snapshot.load();
    snapshot
        .policy
        .inbound
        .as_ref()
        .map_or(crate::http::snapshot::PASSTHROUGH_CONNECT_TIMEOUT, |i| {
            i.timeouts.connect.get()
        })
}

/// How a captured connection's requests are routed: its original destination, resolved to a
/// target once per connection and again only when a reload has replaced the snapshot.
pub struct Capture {
    /// The original destination.
    pub dst: SocketAddr,
    /// Came to the inbound listener.
    pub inbound: bool,
    protocol: Protocol,
    /// The target, with the version of the snapshot it was resolved in.
    resolved: Mutex<(u64, Arc<Target>)>,
}

impl Capture {
    /// Routing for a connection to `dst` speaking `protocol`, resolved in `snapshot`.
    pub fn new(
        dst: SocketAddr,
        inbound: bool,
        protocol: Protocol,
        snapshot: &Snapshot,
        metrics: &Metrics,
    ) -> Self {
        let target = resolve(dst, inbound, protocol, snapshot, metrics);
        Self {
            dst,
            inbound,
            protocol,
            resolved: Mutex::new((snapshot.version, target)),
        }
    }

    /// The connection's target under `snapshot`: a lock of this connection's own, and a new
    /// resolution only after a reload.
    pub fn target(&self, snapshot: &Snapshot, metrics: &Metrics) -> Arc<Target> {
        let mut resolved = self.resolved.lock().unwrap_or_else(|e| e.into_inner());
        if resolved.0 != snapshot.version {
            let target = resolve(self.dst, self.inbound, self.protocol, snapshot, metrics);
            *resolved = (snapshot.version, target);
        }
        Arc::clone(&resolved.1)
    }
}

fn resolve(
    dst: SocketAddr,
    inbound: bool,
    protocol: Protocol,
    snapshot: &Snapshot,
    metrics: &Metrics,
) -> Arc<Target> {
    if inbound {
        return snapshot.captured_inbound(dst, protocol, metrics);
    }
    match snapshot.service_for(dst) {
        Some(target) => Arc::clone(target),
        None => snapshot.passthrough(dst, protocol, metrics),
    }
}
