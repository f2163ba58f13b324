//! Criterion micro-benchmarks of a mesh mTLS handshake in memory: the CPU a new sidecar-to-
//! sidecar connection costs in rustls and aws-lc-rs alone, without sockets or the proxy around
//! it (`load.sh --mtls` measures the whole). Both ends use the proxy's own configs: the client
//! config `Mesh::client_config` builds for a `tls: mesh` service (client certificate, peer
//! verified by SPIFFE id, no resumption) and the inbound side's `ServerConfig` from
//! `Mesh::install`. Run: `cargo bench -p outrider-benches --bench mesh_tls`.
//!
//! - `mesh_tls/both_sides_x25519mlkem768`: a full TLS 1.3 mutual handshake, client and server.
//! - `mesh_tls/server_side_x25519mlkem768`: only the accepting side's share of it (its
//!   `read_tls`, `process_new_packets` and `write_tls` calls), comparable to the extra CPU per
//!   connection of proxy B in `load.sh --mtls`.
//! - `mesh_tls/server_side_x25519`: the same with a client offering only X25519, the cost
//!   without the post-quantum half of the key exchange.
//! - `mesh_tls/server_side_x25519mlkem768_no_tickets`: the proxy's server config sending no
//!   TLS 1.3 session tickets (rustls sends 2 by default, which the proxy's clients, resumption
//!   off, never use): what dropping them would save.

use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::Criterion;
use outrider_config::wire::CertificateResponse;
use outrider_proxy::io::identity::{Mesh, ALPN_HTTP1};
use outrider_proxy::telemetry::metrics::Metrics;
use rustls::pki_types::ServerName;
use rustls::{ClientConfig, ClientConnection, NamedGroup, ServerConfig, ServerConnection};

const CLIENT_ID: &str = "spiffe://cluster.local/ns/bench/sa/client";
const SERVER_ID: &str = "spiffe://cluster.local/ns/bench/sa/server";

/// A CA, and a leaf for `id` signed by it as the control plane issues them (SPIFFE URI SAN
/// only, serverAuth + clientAuth, ECDSA P-256).
struct TestCa {
    issuer: rcgen::Issuer<'static, rcgen::KeyPair>,
    pem: String,
}

impl TestCa {
    fn new() -> Self {
        let key = rcgen::KeyPair::generate().expect("CA key");
        let mut params = rcgen::CertificateParams::default();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Constrained(0));
        params.key_usages = vec![
            rcgen::KeyUsagePurpose::KeyCertSign,
            rcgen::KeyUsagePurpose::DigitalSignature,
        ];
        let cert = params.self_signed(&key).expect("CA certificate");
        Self {
            issuer: rcgen::Issuer::new(params, key),
            pem: cert.pem(),
        }
    }

    fn issue(&self, id: &str) -> (CertificateResponse, Vec<u8>) {
        let key = rcgen::KeyPair::generate().expect("leaf key");
        let mut params = rcgen::CertificateParams::default();
        params.distinguished_name = rcgen::DistinguishedName::new();
        params.subject_alt_names = vec![rcgen::SanType::URI(id.try_into().expect("IA5 URI"))];
        params.key_usages = vec![rcgen::KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![
            rcgen::ExtendedKeyUsagePurpose::ServerAuth,
            rcgen::ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.use_authority_key_identifier_extension = true;
        let now = time::OffsetDateTime::now_utc();
        params.not_before = now - time::Duration::minutes(1);
        params.not_after = now + time::Duration::hours(1);
        let cert = params.signed_by(&key, &self.issuer).expect("leaf");
        let response = CertificateResponse {
            identity: id.to_string(),
            chain: cert.pem(),
            trust_bundle: self.pem.clone(),
            not_before: 0,
            not_after: 1,
        };
        (response, key.serialize_der())
    }
}

/// Hands `bytes` (TLS records) to `conn` and processes them.
fn feed<D>(conn: &mut rustls::ConnectionCommon<D>, mut bytes: &[u8]) {
    while !bytes.is_empty() {
        conn.read_tls(&mut bytes).expect("read_tls from memory");
        conn.process_new_packets().expect("handshake step");
    }
}

/// One handshake between fresh connections; returns the time spent in the server's calls
/// and the key exchange group negotiated.
fn handshake(
    client: &Arc<ClientConfig>,
    server: &Arc<ServerConfig>,
) -> (Duration, Option<NamedGroup>) {
    let name = ServerName::IpAddress(std::net::Ipv4Addr::LOCALHOST.into());
    let mut client = ClientConnection::new(Arc::clone(client), name).expect("client connection");
    let started = Instant::now();
    let mut server = ServerConnection::new(Arc::clone(server)).expect("server connection");
    let mut in_server = started.elapsed();
    let mut wire = Vec::with_capacity(16 * 1024);
    // TLS 1.3 with a client certificate: ClientHello; the server's flight; the client's
    // certificate and Finished; the server's session tickets. A few spare turns.
    for _ in 0..6 {
        if !client.is_handshaking() && !server.is_handshaking() && !server.wants_write() {
            break;
        }
        wire.clear();
        while client.wants_write() {
            client.write_tls(&mut wire).expect("client write");
        }
        let started = Instant::now();
        feed(&mut server, &wire);
        wire.clear();
        while server.wants_write() {
            server.write_tls(&mut wire).expect("server write");
        }
        in_server += started.elapsed();
        feed(&mut client, &wire);
    }
    assert!(
        !client.is_handshaking() && !server.is_handshaking(),
        "handshake did not complete"
    );
    (
        in_server,
        client.negotiated_key_exchange_group().map(|g| g.name()),
    )
}

fn bench_handshake(c: &mut Criterion) {
    let ca = TestCa::new();
    let client_mesh = Mesh::new(&Metrics::new("client").expect("metrics")).expect("mesh");
    let (issued, key) = ca.issue(CLIENT_ID);
    client_mesh
        .install(&issued, key)
        .expect("client certificate");
    let server_mesh = Mesh::new(&Metrics::new("server").expect("metrics")).expect("mesh");
    let (issued, key) = ca.issue(SERVER_ID);
    let server = server_mesh
        .install(&issued, key)
        .expect("server certificate");
    let server = Arc::clone(&server.server);
    // The proxy's server config as it is, but sending no TLS 1.3 session tickets (rustls sends
    // 2 by default; the proxy's clients turn resumption off and never use them).
    let mut no_tickets = (*server).clone();
    no_tickets.send_tls13_tickets = 0;
    let no_tickets = Arc::new(no_tickets);
    let proxy_client = client_mesh
        .client_config(Some(Arc::from(SERVER_ID)), vec![ALPN_HTTP1.to_vec()])
        .expect("client config");
    // The proxy's own client config (verifier, certificate, settings) offering only X25519.
    let mut x25519 = rustls::crypto::aws_lc_rs::default_provider();
    x25519.kx_groups = vec![rustls::crypto::aws_lc_rs::kx_group::X25519];
    let x25519_mesh =
        Mesh::with_provider(&Metrics::new("x25519").expect("metrics"), x25519).expect("mesh");
    let (issued, key) = ca.issue(CLIENT_ID);
    x25519_mesh
        .install(&issued, key)
        .expect("client certificate");
    let x25519_client = x25519_mesh
        .client_config(Some(Arc::from(SERVER_ID)), vec![ALPN_HTTP1.to_vec()])
        .expect("client config");

    // What each client gets, checked once, so the names below are true.
    assert_eq!(
        handshake(&proxy_client, &server).1,
        Some(NamedGroup::X25519MLKEM768)
    );
    assert_eq!(
        handshake(&x25519_client, &server).1,
        Some(NamedGroup::X25519)
    );

    let mut group = c.benchmark_group("mesh_tls");
    // A handshake takes ~0.3-0.6 ms: 50 samples fit the measurement time.
    group.sample_size(50);
    group.bench_function("both_sides_x25519mlkem768", |b| {
        b.iter_custom(|iters| {
            let started = Instant::now();
            for _ in 0..iters {
                std::hint::black_box(handshake(&proxy_client, &server));
            }
            started.elapsed()
        })
    });
    for (name, client, server) in [
        ("server_side_x25519mlkem768", &proxy_client, &server),
        ("server_side_x25519", &x25519_client, &server),
        (
            "server_side_x25519mlkem768_no_tickets",
            &proxy_client,
            &no_tickets,
        ),
    ] {
        group.bench_function(name, |b| {
            b.iter_custom(|iters| (0..iters).map(|_| handshake(client, server).0).sum())
        });
    }
    group.finish();
}

fn main() {
    // What `criterion_group!`/`criterion_main!` expand to, written out so every item is
    // private and documented.
    let mut c = Criterion::default()
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(3))
        .configure_from_args();
    bench_handshake(&mut c);
    c.final_summary();
}
