//! Transparent capture at accept: where a connection was originally going (`SO_ORIGINAL_DST`,
//! `IP6T_SO_ORIGINAL_DST`, read once per connection), whether that makes it captured, explicit
//! or a loop back into this proxy, and the record of the proxy's own upstream sockets that tells
//! a loop apart (a capture rule without the proxy's UID exclusion sends the proxy's own
//! connections back to it).

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, OnceLock};

use tokio::net::TcpStream;

/// What the original destination says about an accepted connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Disposition {
    /// Addressed to the listener itself (or no netfilter NAT record): explicit mode.
    Explicit,
    /// Redirected here by a capture rule; it was going to this address.
    Captured(SocketAddr),
    /// A loop: redirected here while it was going to one of this proxy's own listeners, or
    /// opened by this proxy itself. Refused.
    Loop(LoopKind, SocketAddr),
}

/// How a loop was recognised (the `reason` label of `outrider_capture_loops_total`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LoopKind {
    /// The original destination is a port this proxy listens on.
    OwnListener,
    /// The connection comes from a socket this proxy opened (its UID is not excluded).
    OwnConnection,
}

impl LoopKind {
    /// The metric label.
    pub fn label(self) -> &'static str {
        match self {
            Self::OwnListener => "own_listener",
            Self::OwnConnection => "own_connection",
        }
    }
}

/// The original destination of `stream` (accepted at `local`) as netfilter recorded it, if it
/// has a NAT record. Without conntrack (no capture rules in this network namespace) the call
/// fails: `None`. One system call, per connection.
pub fn original_destination(stream: &TcpStream, local: SocketAddr) -> Option<SocketAddr> {
    let socket = socket2::SockRef::from(stream);
    let original = if local.is_ipv4() {
        socket.original_dst_v4()
    } else {
        socket.original_dst_v6()
    };
    original.ok()?.as_socket()
}

/// Decides what an accepted connection is from its addresses: `local` as accepted, `peer`, and
/// `original` as netfilter recorded it. `listener_ports` are the ports this proxy serves on.
pub fn classify(
    local: SocketAddr,
    peer: SocketAddr,
    original: Option<SocketAddr>,
    listener_ports: &[u16],
) -> Disposition {
    let Some(original) = original.map(canonical) else {
        return Disposition::Explicit;
    };
    if original == canonical(local) {
        return Disposition::Explicit;
    }
    if OwnSockets::global().contains(canonical(peer)) {
        return Disposition::Loop(LoopKind::OwnConnection, original);
    }
    // Redirected while addressed to a port of ours: forwarding it would come straight back.
    let local_ip = canonical(local).ip();
    let ours = original.ip() == local_ip || original.ip().is_loopback();
    if ours && listener_ports.contains(&original.port()) {
        return Disposition::Loop(LoopKind::OwnListener, original);
    }
    Disposition::Captured(original)
}

/// An IPv4-mapped IPv6 address as the IPv4 one, so both spellings compare equal.
fn canonical(addr: SocketAddr) -> SocketAddr {
    match addr {
        SocketAddr::V6(v6) => match v6.ip().to_ipv4_mapped() {
            Some(v4) => SocketAddr::new(v4.into(), v6.port()),
            None => addr,
        },
        v4 => v4,
    }
}

/// The local addresses of the upstream sockets this proxy has open, kept only once capture is
/// in use (the first captured connection turns it on): a connection accepted from one of them
/// is the proxy talking to itself. Explicit mode never takes the lock. One lock per upstream
/// connection opened and closed, never per request.
pub struct OwnSockets {
    active: AtomicBool,
    open: Mutex<HashSet<SocketAddr>>,
}

impl OwnSockets {
    /// Most addresses recorded; past it new sockets go unrecorded (a loop through them would
    /// then be caught by the connection caps instead). Bounded like every other table.
    const MAX: usize = 65_536;

    /// The process-wide record (upstream sockets belong to the process, whichever proxy in it
    /// opened them).
    pub fn global() -> &'static OwnSockets {
        static OWN: OnceLock<OwnSockets> = OnceLock::new();
        OWN.get_or_init(|| OwnSockets {
            active: AtomicBool::new(false),
            open: Mutex::new(HashSet::new()),
        })
    }

    /// Starts recording (idempotent): called when a captured connection is seen.
    pub fn activate(&self) {
        self.active.store(true, Ordering::Relaxed);
    }

    /// Records `stream`'s local address until the guard drops; nothing before capture is on.
    pub fn record(&'static self, stream: &TcpStream) -> Option<OwnSocket> {
        if !self.active.load(Ordering::Relaxed) {
            return None;
        }
        let local = canonical(stream.local_addr().ok()?);
        let mut open = self.open.lock().unwrap_or_else(|e| e.into_inner());
        if open.len() >= Self::MAX || !open.insert(local) {
            return None;
        }
        Some(OwnSocket {
            record: self,
            local,
        })
    }

    /// Whether `peer` is one of the proxy's own upstream sockets. Checked at accept and again
    /// once a captured connection has sent something (or its relay is connected): the socket is
    /// recorded right after its connect returns, which may be just after the accept.
    pub fn is_own(&self, peer: SocketAddr) -> bool {
        self.contains(canonical(peer))
    }

    fn contains(&self, addr: SocketAddr) -> bool {
        if !self.active.load(Ordering::Relaxed) {
            return false;
        }
        let open = self.open.lock().unwrap_or_else(|e| e.into_inner());
        open.contains(&addr)
    }
}

/// One recorded upstream socket; removed from the record when dropped (with the socket).
pub struct OwnSocket {
    record: &'static OwnSockets,
    local: SocketAddr,
}

impl Drop for OwnSocket {
    fn drop(&mut self) {
        let mut open = self.record.open.lock().unwrap_or_else(|e| e.into_inner());
        open.remove(&self.local);
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn no_record_or_the_listener_itself_is_explicit() {
        let local = addr("127.0.0.1:15001");
        let peer = addr("127.0.0.1:40000");
        assert_eq!(classify(local, peer, None, &[15001]), Disposition::Explicit);
        assert_eq!(
            classify(local, peer, Some(local), &[15001]),
            Disposition::Explicit
        );
        // A dual-stack socket reports an IPv4 connection as mapped.
        let mapped = addr("[::ffff:127.0.0.1]:15001");
        assert_eq!(
            classify(mapped, peer, Some(local), &[15001]),
            Disposition::Explicit
        );
    }

    #[test]
    fn another_destination_was_captured() {
        let local = addr("127.0.0.1:15001");
        let peer = addr("192.0.2.10:40000");
        let original = addr("192.0.2.20:8080");
        assert_eq!(
            classify(local, peer, Some(original), &[15001, 15006, 15000]),
            Disposition::Captured(original)
        );
        // Inbound: the pod's own address and the app's port.
        let local = addr("192.0.2.10:15006");
        let original = addr("192.0.2.10:8080");
        assert_eq!(
            classify(local, peer, Some(original), &[15001, 15006, 15000]),
            Disposition::Captured(original)
        );
    }

    #[test]
    fn a_destination_that_is_one_of_our_ports_is_a_loop() {
        let local = addr("192.0.2.10:15006");
        let peer = addr("192.0.2.30:40000");
        for original in ["192.0.2.10:15001", "127.0.0.1:15000"] {
            assert_eq!(
                classify(local, peer, Some(addr(original)), &[15001, 15006, 15000]),
                Disposition::Loop(LoopKind::OwnListener, addr(original)),
                "{original}"
            );
        }
        // The same port on another host is someone else's.
        assert_eq!(
            classify(local, peer, Some(addr("192.0.2.99:15001")), &[15001]),
            Disposition::Captured(addr("192.0.2.99:15001"))
        );
    }

    #[tokio::test]
    async fn a_connection_from_our_own_socket_is_a_loop_once_capture_is_on() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let ours = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (_accepted, peer) = listener.accept().await.unwrap();
        let own = OwnSockets::global();
        own.activate();
        let recorded = own.record(&ours).unwrap();
        let local = addr("127.0.0.1:15001");
        let original = Some(addr("192.0.2.20:80"));
        assert_eq!(
            classify(local, peer, original, &[15001]),
            Disposition::Loop(LoopKind::OwnConnection, addr("192.0.2.20:80"))
        );
        drop(recorded);
        assert_eq!(
            classify(local, peer, original, &[15001]),
            Disposition::Captured(addr("192.0.2.20:80"))
        );
    }
}
