//! The control-plane wire protocol, shared by `outrider-control` (server) and `outrider-proxy`
//! (subscriber). Plain serde data, encoded as JSON by both sides.
//!
//! - Subscribe: `GET /v1/subscribe?workload=W&proxy=ID&have_version=N&have_hash=H` with
//!   `Authorization: Bearer <token>`, over HTTP/2 (h2c, prior knowledge) or HTTP/1.1. The
//!   response (200, `content-type: application/x-ndjson`) is a body that never ends on its own:
//!   one [`ServerMessage`] per line. The server first sends the workload's current
//!   [`PolicyUpdate`] unless `have_hash` already equals its hash (a reconnecting proxy resumes
//!   without a re-push), then one update per accepted change that alters the workload's merged
//!   policy, and a [`ServerMessage::Heartbeat`] every [`HEARTBEAT_SECS`] seconds so a dead
//!   stream is noticed.
//!   The answer's [`SESSION_HEADER`] is the subscription's session id; its
//!   [`UNSELECTED_HEADER`] says when no document names the workload. While a subscription is
//!   live, another one under the same `proxy` id is refused (409) unless it presents that id as
//!   `session=ID` (the same proxy reconnecting before its old stream was noticed gone).
//! - Acknowledge: `POST /v1/ack` with a JSON [`Ack`] body, same token; 204 on success, 409 when
//!   its session is not the proxy's live one or that session was never sent the policy it
//!   names. A proxy that resumed with `have_hash` also ACKs the version it runs once the stream
//!   is open, so a restarted server knows it without pushing anything.
//! - Certificate: `POST /v1/certificate` with a JSON [`CertificateRequest`] (a CSR made with a
//!   key that never leaves the proxy, and the namespace and service account it asks to be),
//!   same token; 200 with a [`CertificateResponse`] (leaf chain and trust bundle, PEM).
//! - Registration: `POST /v1/register` with a JSON [`Registration`] (the services this proxy's
//!   workload serves and the address callers reach it at), same token; 200 with a
//!   [`RegistrationLease`]. The registration lives for the lease's TTL and is renewed by
//!   posting it again, at a third of the TTL. `POST /v1/deregister` with a JSON
//!   [`Deregistration`] ends it at once (a draining proxy); 204.
//! - Endpoints: a subscription with `endpoints=1` ([`ENDPOINTS_QUERY`]) also receives, for each
//!   service of its policy with `discovery: registry`, that service's registered addresses as a
//!   [`ServerMessage::Endpoints`] line: after each policy update, and whenever they change.
//!   Without it (proxies that predate the registry) none is sent; a subscriber ignores a
//!   message `type` it does not know ([`ServerMessage::Unknown`]), so later kinds can be added
//!   the same way.
//! - A missing or wrong token gets 401 on every endpoint.

use serde::{Deserialize, Serialize};

/// Path of the subscription stream.
pub const SUBSCRIBE_PATH: &str = "/v1/subscribe";
/// Path proxies post their ACK/NACK to.
pub const ACK_PATH: &str = "/v1/ack";
/// Response header of a subscription carrying its session id.
pub const SESSION_HEADER: &str = "x-outrider-session";
/// Response header of a subscription, `1` when no policy document names the workload (as
/// [`PolicyUpdate::unselected`], for a proxy that resumed and is sent no update).
pub const UNSELECTED_HEADER: &str = "x-outrider-workload-unselected";
/// Seconds between heartbeats on an idle subscription; a subscriber that hears nothing for
/// three times this long reconnects.
pub const HEARTBEAT_SECS: u64 = 10;
/// Longest stream line (a [`ServerMessage`] and its newline) a subscriber reads: a control
/// plane refuses a change whose merged policy would not fit, and a subscriber NACKs a line
/// longer than this and skips it.
pub const MAX_LINE: usize = 16 * 1024 * 1024;

/// Path proxies post their [`Registration`] (and its renewals) to.
pub const REGISTER_PATH: &str = "/v1/register";
/// Path a draining proxy posts its [`Deregistration`] to.
pub const DEREGISTER_PATH: &str = "/v1/deregister";
/// Query parameter of a subscription asking for [`ServerMessage::Endpoints`] (`endpoints=1`).
pub const ENDPOINTS_QUERY: &str = "endpoints";
/// Most services one proxy registers.
pub const MAX_REGISTERED_SERVICES: usize = 16;

/// A proxy registering its workload as the endpoint of services.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Registration {
    /// The proxy's id, as given when subscribing; one registration per proxy.
    pub proxy: String,
    /// The services the workload serves (at most [`MAX_REGISTERED_SERVICES`]).
    pub services: Vec<String>,
    /// Where callers reach the workload: its proxy's inbound port.
    pub address: std::net::SocketAddr,
}

/// The answer to a [`Registration`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct RegistrationLease {
    /// Milliseconds the registration lives unless posted again.
    pub ttl_ms: u64,
}

/// A proxy leaving the registry (it drains).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Deregistration {
    /// The proxy's id.
    pub proxy: String,
}

/// Path proxies post their certificate signing requests to.
pub const CERTIFICATE_PATH: &str = "/v1/certificate";
/// Header of a certificate request or a subscription carrying the pod's Kubernetes
/// service-account token, which a control plane that binds identities to service accounts
/// verifies.
pub const SERVICE_ACCOUNT_TOKEN_HEADER: &str = "x-outrider-service-account-token";

/// A proxy asking for its workload certificate.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CertificateRequest {
    /// PKCS#10 certificate signing request, PEM. Only its public key is used: the names in
    /// the certificate are the control plane's choice.
    pub csr: String,
    /// Kubernetes namespace of the workload.
    pub namespace: String,
    /// Service account of the workload.
    pub service_account: String,
}

/// An issued workload certificate.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CertificateResponse {
    /// The SPIFFE id in the certificate's URI SAN.
    pub identity: String,
    /// Leaf first, then any intermediates, PEM.
    pub chain: String,
    /// The roots a peer's certificate must chain to, PEM.
    pub trust_bundle: String,
    /// Start of validity, Unix seconds.
    pub not_before: u64,
    /// End of validity, Unix seconds.
    pub not_after: u64,
}

/// `spiffe://<trust_domain>/ns/<namespace>/sa/<service_account>`.
pub fn spiffe_id(trust_domain: &str, namespace: &str, service_account: &str) -> String {
    format!("spiffe://{trust_domain}/ns/{namespace}/sa/{service_account}")
}

/// Splits a workload SPIFFE id into trust domain, namespace and service account; `None` when
/// it is not of the form [`spiffe_id`] makes or a part is refused by [`crate::spiffe::parse`].
pub fn parse_spiffe_id(id: &str) -> Option<(&str, &str, &str)> {
    let id = crate::spiffe::parse(id).ok()?;
    Some((id.trust_domain, id.namespace, id.service_account))
}

/// Whether `name` may be a namespace or service account: a DNS-1123 label
/// ([`crate::spiffe::is_dns1123_label`]).
pub fn valid_identity_part(name: &str) -> bool {
    crate::spiffe::is_dns1123_label(name)
}

/// One line of the subscription stream.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ServerMessage {
    /// A new merged policy for the subscriber's workload.
    Update(PolicyUpdate),
    /// Nothing changed; the stream is alive.
    Heartbeat,
    /// The registered addresses of one `discovery: registry` service (the whole set), sent
    /// only to subscribers that asked with [`ENDPOINTS_QUERY`].
    Endpoints(EndpointsUpdate),
    /// A message kind this build does not know (sent by a newer control plane): ignored.
    #[serde(other)]
    Unknown,
}

/// The endpoints of one service, as registered now.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EndpointsUpdate {
    /// The service.
    pub service: String,
    /// Its registered addresses, sorted; empty when none is registered.
    pub addresses: Vec<std::net::SocketAddr>,
}

/// A workload's merged policy at one control-plane version.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PolicyUpdate {
    /// Control-plane version this policy was merged at; increases with every accepted change.
    pub version: u64,
    /// Hex SHA-256 of `policy` (see [`crate::content_hash`]).
    pub content_hash: String,
    /// The merged policy as YAML, loadable with [`crate::load`].
    pub policy: String,
    /// No policy document names the subscriber's workload: it receives only the defaults (a
    /// misspelt `--workload`?). Absent, so false, from control planes that predate it.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub unselected: bool,
}

/// A proxy's answer to a [`PolicyUpdate`], like xDS's ACK/NACK.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ack {
    /// The proxy's id, as given when subscribing.
    pub proxy: String,
    /// The proxy's workload.
    pub workload: String,
    /// The version answered.
    pub version: u64,
    /// Hash of the policy answered.
    pub content_hash: String,
    /// `None`: applied (ACK). `Some(reason)`: rejected and the previous policy kept (NACK).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// The session id of the subscription the policy came on ([`SESSION_HEADER`]).
    #[serde(default)]
    pub session: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spiffe_ids_round_trip_and_reject_other_forms() {
        let id = spiffe_id("cluster.local", "shop", "checkout");
        assert_eq!(id, "spiffe://cluster.local/ns/shop/sa/checkout");
        assert_eq!(
            parse_spiffe_id(&id),
            Some(("cluster.local", "shop", "checkout"))
        );
        for bad in [
            "https://cluster.local/ns/a/sa/b",
            "spiffe://cluster.local/ns/a/sa/",
            "spiffe://cluster.local/ns/a/sa/b/c",
            "spiffe://cluster.local/a/b",
            "spiffe:///ns/a/sa/b",
        ] {
            assert_eq!(parse_spiffe_id(bad), None, "{bad}");
        }
        assert!(valid_identity_part("checkout"));
        assert!(!valid_identity_part("a/sa/b"));
        assert!(!valid_identity_part(""));
    }

    #[test]
    fn messages_are_tagged() {
        let json = serde_json::to_string(&ServerMessage::Heartbeat).expect("encode");
        assert_eq!(json, r#"{"type":"heartbeat"}"#);
        let update = ServerMessage::Update(PolicyUpdate {
            version: 3,
            content_hash: "ab".into(),
            policy: "services: {}\n".into(),
            unselected: false,
        });
        let json = serde_json::to_string(&update).expect("encode");
        assert!(
            json.starts_with(r#"{"type":"update","version":3"#),
            "{json}"
        );
        let back: ServerMessage = serde_json::from_str(&json).expect("decode");
        assert_eq!(back, update);
        let endpoints = ServerMessage::Endpoints(EndpointsUpdate {
            service: "pay".into(),
            addresses: vec!["127.0.0.1:8080".parse().expect("addr")],
        });
        let json = serde_json::to_string(&endpoints).expect("encode");
        assert_eq!(
            json,
            r#"{"type":"endpoints","service":"pay","addresses":["127.0.0.1:8080"]}"#
        );
        assert_eq!(
            serde_json::from_str::<ServerMessage>(&json).expect("decode"),
            endpoints
        );
        // A kind from a newer control plane is read as unknown, not as an error.
        let later: ServerMessage =
            serde_json::from_str(r#"{"type":"routes_delta","routes":[1,2]}"#).expect("decode");
        assert_eq!(later, ServerMessage::Unknown);
    }
}
