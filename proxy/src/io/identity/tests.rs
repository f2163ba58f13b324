use rustls::pki_types::ServerName;

use super::*;

#[test]
fn key_exchange_offers_the_hybrid_post_quantum_group_first() {
    let metrics = Metrics::new("test").expect("metrics");
    let mesh = Mesh::new(&metrics).expect("mesh");
    let groups: Vec<_> = mesh.provider().kx_groups.iter().map(|g| g.name()).collect();
    assert_eq!(groups.first(), Some(&rustls::NamedGroup::X25519MLKEM768));
    assert!(groups.contains(&rustls::NamedGroup::X25519));
}

/// A CA and a leaf for `id` signed by it, as the control plane would answer.
pub(super) fn issue(
    ca: &rcgen::Issuer<'_, rcgen::KeyPair>,
    ca_pem: &str,
    id: &str,
) -> (CertificateResponse, Vec<u8>) {
    let key = rcgen::KeyPair::generate().expect("key");
    let mut params = rcgen::CertificateParams::default();
    params.subject_alt_names = vec![rcgen::SanType::URI(id.try_into().expect("ia5"))];
    params.extended_key_usages = vec![
        rcgen::ExtendedKeyUsagePurpose::ServerAuth,
        rcgen::ExtendedKeyUsagePurpose::ClientAuth,
    ];
    let now = time::OffsetDateTime::now_utc();
    params.not_before = now - time::Duration::minutes(1);
    params.not_after = now + time::Duration::hours(1);
    let cert = params.signed_by(&key, ca).expect("leaf");
    let response = CertificateResponse {
        identity: id.to_string(),
        chain: cert.pem(),
        trust_bundle: ca_pem.to_string(),
        not_before: 0,
        not_after: 1,
    };
    (response, key.serialize_der())
}

#[tokio::test]
async fn mesh_handshake_negotiates_x25519mlkem768_and_both_sides_see_the_peer_identity() {
    let (ca_cert, ca) = test_ca("test CA");
    let (client_id, server_id) = ("spiffe://td/ns/a/sa/client", "spiffe://td/ns/a/sa/server");

    let client = Mesh::new(&Metrics::new("client").expect("metrics")).expect("mesh");
    let (issued, key) = issue(&ca, &ca_cert.pem(), client_id);
    client.install(&issued, key).expect("install client");
    let server = Mesh::new(&Metrics::new("server").expect("metrics")).expect("mesh");
    let (issued, key) = issue(&ca, &ca_cert.pem(), server_id);
    let held = server.install(&issued, key).expect("install server");

    let config = client
        .client_config(Some(Arc::from(server_id)), vec![ALPN_H2.to_vec()])
        .expect("client config");
    let (a, b) = tokio::io::duplex(64 * 1024);
    let name = ServerName::IpAddress(std::net::Ipv4Addr::LOCALHOST.into());
    let (client_side, server_side) = tokio::join!(
        tokio_rustls::TlsConnector::from(config).connect(name, a),
        tokio_rustls::TlsAcceptor::from(Arc::clone(&held.server)).accept(b),
    );
    let (client_side, server_side) = (client_side.expect("client"), server_side.expect("server"));
    let (_, conn) = client_side.get_ref();
    assert_eq!(
        conn.negotiated_key_exchange_group().map(|g| g.name()),
        Some(rustls::NamedGroup::X25519MLKEM768)
    );
    assert_eq!(
        conn.protocol_version(),
        Some(rustls::ProtocolVersion::TLSv1_3)
    );
    assert_eq!(conn.alpn_protocol(), Some(ALPN_H2));
    let peer = |certs: Option<&[CertificateDer<'static>]>| {
        certs.and_then(|c| c.first()).and_then(spiffe_id_of)
    };
    assert_eq!(peer(conn.peer_certificates()).as_deref(), Some(server_id));
    let (_, conn) = server_side.get_ref();
    assert_eq!(peer(conn.peer_certificates()).as_deref(), Some(client_id));
}

#[test]
fn spiffe_id_is_read_from_the_uri_san() {
    let key = rcgen::KeyPair::generate().expect("key");
    let mut params =
        rcgen::CertificateParams::new(vec!["example.com".to_string()]).expect("params");
    params.subject_alt_names.push(rcgen::SanType::URI(
        "spiffe://td/ns/a/sa/b".try_into().expect("ia5"),
    ));
    let cert = params.self_signed(&key).expect("cert");
    assert_eq!(
        spiffe_id_of(cert.der()).as_deref(),
        Some("spiffe://td/ns/a/sa/b")
    );
    let plain = rcgen::CertificateParams::new(vec!["example.com".to_string()])
        .expect("params")
        .self_signed(&key)
        .expect("cert");
    assert_eq!(spiffe_id_of(plain.der()), None);
}
