//! Mesh mTLS end to end: the real `outrider-control` (CA and policy) and two real
//! `outrider-proxy` processes on 127.0.0.1. The caller's app talks plain HTTP to its proxy's
//! outbound port; the caller proxy reaches the callee proxy's inbound port over mTLS with a
//! certificate the control plane issued; the callee's app sees the caller's identity.

#![allow(clippy::unwrap_used, missing_docs)]

use std::net::SocketAddr;
use std::time::Duration;

use http::Request;
use outrider_e2e::control::{start_control, start_control_with, Control, ControlDirs};
use outrider_e2e::service_account::TokenIssuer;
use outrider_e2e::{empty, get, http1_client, raw_exchange, send, Proto, Proxy, TempDir, Upstream};

const CHECKOUT: &str = "spiffe://cluster.local/ns/shop/sa/checkout";
const PAYMENTS: &str = "spiffe://cluster.local/ns/shop/sa/payments";
const IDENTITY_HEADER: &str = "x-outrider-peer-identity";

/// Starts a proxy for `workload` (namespace `shop`, service account `sa`), policy and
/// certificate from `control`.
fn start_meshed(control: &Control, dirs: &ControlDirs, workload: &str, sa: &str) -> Proxy {
    control.spawn_meshed_proxy(dirs, workload, "shop", sa, &[])
}

/// How many lines the control plane has logged that contain `needle`.
fn control_logged(control: &Control, needle: &str) -> usize {
    control.logs().iter().filter(|l| l.contains(needle)).count()
}

/// Whether `proxy` logs a line matching `pred` within 5 s (its stderr is read by a thread).
async fn logged(proxy: &Proxy, pred: impl Fn(&str) -> bool) -> bool {
    outrider_e2e::eventually(Duration::from_secs(5), || {
        proxy.logs().iter().any(|l| pred(l))
    })
    .await
}

fn callee_doc(app: SocketAddr, mtls: &str, allow: &[&str]) -> String {
    let authorization = if allow.is_empty() {
        String::new()
    } else {
        format!("\n  authorization: {{ allow: [{}] }}", allow.join(", "))
    };
    format!("workload: payments\ninbound:\n  app: {app}\n  mtls: {mtls}{authorization}\n")
}

fn caller_doc(callee: SocketAddr, identity: &str, connect: &str) -> String {
    format!(
        "workload: checkout
services:
  payments:
    endpoints: [{callee}]
    tls: mesh
    identity: {identity}
    timeouts: {{ connect: {connect} }}
routes:
  - match: {{ authority: payments }}
    service: payments
"
    )
}

/// A control plane, the callee (payments: echo app behind a strict, authorizing inbound) and
/// the caller (checkout, expecting `expected` as the callee's identity).
struct Mesh {
    dirs: ControlDirs,
    control: Control,
    app: Upstream,
    callee: Proxy,
    caller: Proxy,
}

async fn start_mesh(expected: &str, ttl: &str, mtls: &str) -> Mesh {
    start_mesh_with(expected, mtls, &["--cert-ttl", ttl]).await
}

/// [`start_mesh`] with the control plane's flags given.
async fn start_mesh_with(expected: &str, mtls: &str, control_flags: &[&str]) -> Mesh {
    let dirs = ControlDirs::new();
    let control = start_control_with(&dirs, control_flags);
    let app = Upstream::echo(Proto::Http1, "payments-app").await;
    dirs.write("payments.yaml", &callee_doc(app.addr, mtls, &[CHECKOUT]));
    let callee = start_meshed(&control, &dirs, "payments", "payments");
    dirs.write("checkout.yaml", &caller_doc(callee.inbound, expected, "1s"));
    let caller = start_meshed(&control, &dirs, "checkout", "checkout");
    callee.wait_ready().await;
    caller.wait_ready().await;
    // Ready means a policy and a certificate are held, but a proxy that subscribed before the
    // control plane read the file just written runs the workload's empty policy (permissive
    // inbound, no route) until the next push: wait for the documents' own.
    callee.wait_policy(&app.addr.to_string()).await;
    caller.wait_policy(&callee.inbound.to_string()).await;
    Mesh {
        dirs,
        control,
        app,
        callee,
        caller,
    }
}

async fn get_spoofing(addr: SocketAddr, spoof: &str) -> outrider_e2e::Reply {
    send(
        &http1_client(),
        Request::get(format!("http://{addr}/charge"))
            .header("host", "payments")
            .header(IDENTITY_HEADER, spoof)
            .body(empty())
            .unwrap(),
    )
    .await
}

#[tokio::test]
async fn a_request_crosses_mtls_and_the_callee_app_sees_the_verified_caller() {
    let mesh = start_mesh(PAYMENTS, "1h", "strict").await;
    // The app tries to claim another identity: the caller proxy passes the header on, and the
    // callee proxy replaces it with the one it verified.
    let reply = get_spoofing(
        mesh.caller.outbound,
        "spiffe://cluster.local/ns/shop/sa/admin",
    )
    .await;
    assert_eq!(
        reply.status,
        200,
        "{}",
        String::from_utf8_lossy(&reply.body)
    );
    let echo = reply.json();
    assert_eq!(echo["server"], "payments-app");
    assert_eq!(echo["headers"][IDENTITY_HEADER], CHECKOUT);
    assert_eq!(mesh.app.hits(), 1);

    // Each proxy shows the identity in force; the expiry metric is set.
    let (_, identity) = mesh.caller.admin_get("/identity").await;
    let identity: serde_json::Value = serde_json::from_str(&identity).unwrap();
    assert_eq!(identity["identity"], CHECKOUT);
    let not_after = identity["not_after"].as_u64().unwrap();
    assert_eq!(
        mesh.caller
            .metric("outrider_mesh_certificate_expiry_timestamp_seconds")
            .await,
        not_after as f64
    );
    // ~1 h from now.
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    assert!(
        (now + 3500..=now + 3600).contains(&not_after),
        "{not_after} vs {now}"
    );
    let issued = || control_logged(&mesh.control, "certificate issued");
    outrider_e2e::eventually(Duration::from_secs(5), || issued() >= 2).await;
    assert_eq!(issued(), 2, "one certificate per proxy");
}

#[tokio::test]
async fn plaintext_is_refused_by_a_strict_port_and_served_by_a_permissive_one() {
    let mesh = start_mesh(PAYMENTS, "1h", "strict").await;
    // A plain HTTP/1.1 client straight to the callee's inbound port: closed without a byte.
    let answer = raw_exchange(
        mesh.callee.inbound,
        b"GET /charge HTTP/1.1\r\nhost: payments\r\n\r\n",
        Duration::from_secs(5),
    )
    .await;
    assert_eq!(answer, "", "strict port answered plaintext");
    assert_eq!(mesh.app.hits(), 0);
    assert_eq!(
        mesh.callee
            .metric("outrider_tls_handshake_failures_total{direction=\"inbound\",reason=\"plaintext_refused\"}")
            .await,
        1.0
    );
    assert!(logged(&mesh.callee, |l| l.contains("plaintext connection refused")).await);

    // Permissive: plaintext is served, without an identity (and a claimed one is removed)...
    mesh.dirs.write(
        "payments.yaml",
        &callee_doc(mesh.app.addr, "permissive", &[]),
    );
    mesh.callee.wait_policy("permissive").await;
    let reply = get_spoofing(mesh.callee.inbound, CHECKOUT).await;
    assert_eq!(reply.status, 200);
    assert!(reply.json()["headers"].get(IDENTITY_HEADER).is_none());
    // ... and mTLS still is, with one.
    let reply = get(mesh.caller.outbound, "payments", "/charge").await;
    assert_eq!(reply.status, 200);
    assert_eq!(reply.json()["headers"][IDENTITY_HEADER], CHECKOUT);
}

#[tokio::test]
async fn authorization_allows_listed_callers_and_answers_others_403() {
    let mesh = start_mesh(PAYMENTS, "1h", "permissive").await;
    // checkout is allowed.
    assert_eq!(
        get(mesh.caller.outbound, "payments", "/charge")
            .await
            .status,
        200
    );
    // A plaintext caller has no identity: 403, with the reason.
    let reply = get(mesh.callee.inbound, "payments", "/charge").await;
    assert_eq!(reply.status, 403);
    assert_eq!(
        reply.header("x-outrider-error"),
        Some("default deny (caller without a mesh identity)")
    );
    // Only some other workload is allowed now: checkout gets 403 too.
    mesh.dirs.write(
        "payments.yaml",
        &callee_doc(
            mesh.app.addr,
            "permissive",
            &["spiffe://cluster.local/ns/shop/sa/orders"],
        ),
    );
    mesh.callee.wait_policy("sa/orders").await;
    let reply = get(mesh.caller.outbound, "payments", "/charge").await;
    assert_eq!(reply.status, 403);
    assert_eq!(
        reply.header("x-outrider-error"),
        Some(format!("default deny (caller {CHECKOUT})").as_str())
    );
    assert_eq!(mesh.app.hits(), 1, "refused requests never reach the app");
    // Both refusals counted, as the proxy's own (response flag UAEX).
    let refused = "outrider_requests_total{code=\"403\",direction=\"inbound\",flags=\"UAEX\",method=\"GET\",route=\"inbound\",service=\"app\",status_class=\"4xx\"}";
    assert_eq!(mesh.callee.metric(refused).await, 2.0);
}

#[tokio::test]
async fn a_peer_with_another_identity_is_refused_with_the_reason_logged() {
    // The caller expects orders at that address, but payments answers.
    let mesh = start_mesh("spiffe://cluster.local/ns/shop/sa/orders", "1h", "strict").await;
    let reply = get(mesh.caller.outbound, "payments", "/charge").await;
    assert_eq!(reply.status, 502);
    let error = reply.header("x-outrider-error").unwrap();
    assert!(
        error.contains("wrong_identity") && error.contains(PAYMENTS),
        "{error}"
    );
    assert_eq!(mesh.app.hits(), 0);
    // stderr is read by another thread: the line may land just after the response.
    let logged = logged(&mesh.caller, |l| {
        l.contains("mesh TLS handshake to upstream failed")
            && l.contains("\"reason\":\"wrong_identity\"")
            && l.contains("is not the expected spiffe://cluster.local/ns/shop/sa/orders")
    })
    .await;
    assert!(logged, "{}", mesh.caller.logs().join("\n"));
}

#[tokio::test]
async fn a_peer_certified_by_another_ca_is_refused_as_untrusted() {
    let mesh = start_mesh(PAYMENTS, "1h", "strict").await;
    // A second control plane, with its own CA, certifies an impostor checkout.
    let other_dirs = ControlDirs::new();
    let other = start_control_with(&other_dirs, &[]);
    other_dirs.write(
        "checkout.yaml",
        &caller_doc(mesh.callee.inbound, PAYMENTS, "1s"),
    );
    let impostor = start_meshed(&other, &other_dirs, "checkout", "checkout");
    impostor.wait_ready().await;
    // Ready may come on the workload's empty policy, before the control plane has read the
    // document just written (its watcher waits for the file to hold still).
    impostor.wait_policy("payments").await;
    let reply = get(impostor.outbound, "payments", "/charge").await;
    assert_eq!(reply.status, 502);
    assert!(reply
        .header("x-outrider-error")
        .unwrap()
        .contains("untrusted"));
    assert!(logged(&impostor, |l| l.contains("\"reason\":\"untrusted\"")).await);
    assert_eq!(mesh.app.hits(), 0);
}

#[tokio::test]
async fn an_expired_certificate_is_refused() {
    // 3 s certificates, and the control plane gone before the first renewal: both proxies
    // keep certificates that expire.
    let mesh = start_mesh(PAYMENTS, "3s", "strict").await;
    let (_, identity) = mesh.caller.admin_get("/identity").await;
    let not_after = serde_json::from_str::<serde_json::Value>(&identity).unwrap()["not_after"]
        .as_u64()
        .unwrap();
    let Mesh {
        dirs: _dirs,
        control,
        app,
        callee: _callee,
        caller,
    } = mesh;
    control.kill();
    // Past the expiry (1 s of slack for the second boundary).
    loop {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs();
        if now > not_after + 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let reply = get(caller.outbound, "payments", "/charge").await;
    assert_eq!(reply.status, 502);
    assert!(
        reply
            .header("x-outrider-error")
            .unwrap()
            .contains("expired"),
        "{:?}",
        reply.header("x-outrider-error")
    );
    assert_eq!(app.hits(), 0);
}

#[tokio::test]
async fn rotation_under_load_loses_no_request() {
    // 3 s certificates: renewed every 1.4-2.1 s (70% of the 2-3 whole seconds left when one
    // arrives). The load runs 8 s; every second the caller's
    // policy changes its connect timeout, which rebuilds its pool, so new mTLS connections are
    // made throughout, each with whatever certificate is in force.
    let started = tokio::time::Instant::now();
    let mesh = start_mesh(PAYMENTS, "3s", "strict").await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(8);
    let mut workers = Vec::new();
    for _ in 0..4 {
        let outbound = mesh.caller.outbound;
        workers.push(tokio::spawn(async move {
            let client = http1_client();
            let (mut ok, mut failed) = (0u32, Vec::new());
            while tokio::time::Instant::now() < deadline && ok < 5000 {
                let req = Request::get(format!("http://{outbound}/charge"))
                    .header("host", "payments")
                    .body(empty())
                    .unwrap();
                match client.request(req).await {
                    Ok(res) if res.status() == 200 => ok += 1,
                    Ok(res) => failed.push(res.status().to_string()),
                    Err(e) => failed.push(e.to_string()),
                }
            }
            (ok, failed)
        }));
    }
    let mut flip = 0;
    while tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_secs(1)).await;
        flip += 1;
        let connect = if flip % 2 == 0 { "1s" } else { "2s" };
        mesh.dirs.write(
            "checkout.yaml",
            &caller_doc(mesh.callee.inbound, PAYMENTS, connect),
        );
    }
    let (mut ok, mut failed) = (0, Vec::new());
    for worker in workers {
        let (o, f) = worker.await.unwrap();
        ok += o;
        failed.extend(f);
    }
    assert!(
        failed.is_empty(),
        "{} failed: {:?}",
        failed.len(),
        &failed[..failed.len().min(5)]
    );
    assert!(ok > 100, "only {ok} requests");
    for proxy in [&mesh.caller, &mesh.callee] {
        let renewals = proxy
            .metric("outrider_mesh_certificate_fetches_total{result=\"ok\"}")
            .await;
        // Renewed, but at the pace the lifetime asks for: a renewal point put in the past (the
        // CA's 60 s backdate counted as lifetime) once fetched 2,000 certificates here.
        let most = started.elapsed().as_secs_f64() / 1.4 + 1.0;
        assert!(
            (3.0..=most).contains(&renewals),
            "{renewals} certificates fetched, expected 3 to {most:.1}"
        );
    }
}

#[tokio::test]
async fn strict_inbound_without_an_identity_refuses_plaintext_instead_of_ignoring_it() {
    let app = Upstream::echo(Proto::Http1, "app").await;
    let proxy =
        outrider_e2e::start_proxy(&format!("inbound:\n  app: {}\n  mtls: strict\n", app.addr));
    let answer = raw_exchange(
        proxy.inbound,
        b"GET / HTTP/1.1\r\nhost: app\r\n\r\n",
        Duration::from_secs(5),
    )
    .await;
    assert_eq!(answer, "");
    assert_eq!(app.hits(), 0);
    assert!(
        logged(&proxy, |l| l.contains(
            "inbound mTLS is strict but this proxy has no workload identity"
        ))
        .await
    );
}

/// Waits for `proxy` to log a certificate refusal containing `reason`, then checks it holds no
/// identity (not ready) and counted the failure.
async fn refused_with(proxy: &Proxy, reason: &str) {
    assert!(
        logged(proxy, |l| l.contains("cannot get a workload certificate")
            && l.contains("403")
            && l.contains(reason))
        .await,
        "no refusal with {reason:?}; logs:\n{}",
        proxy.logs().join("\n")
    );
    assert_eq!(proxy.admin_get("/ready").await.0, 503);
    let (_, identity) = proxy.admin_get("/identity").await;
    let identity: serde_json::Value = serde_json::from_str(&identity).unwrap();
    assert!(
        identity["identity"].is_null(),
        "an identity is held: {identity}"
    );
    assert!(
        proxy
            .metric("outrider_mesh_certificate_fetches_total{result=\"error\"}")
            .await
            >= 1.0
    );
}

#[tokio::test]
async fn certificates_go_only_to_the_service_account_a_pods_token_proves() {
    let issuer = TokenIssuer::new();
    let dirs = ControlDirs::new();
    let flags = issuer.control_flags();
    let control = start_control_with(&dirs, &flags.each_ref().map(String::as_str));
    let app = Upstream::echo(Proto::Http1, "payments-app").await;
    dirs.write(
        "payments.yaml",
        &callee_doc(app.addr, "strict", &[CHECKOUT]),
    );
    let token = |name: &str| {
        vec![
            "--identity-token-file".into(),
            issuer.token_file("shop", name, "outrider", 3600),
        ]
    };

    // Each pod proves its own service account: both certified, and the mesh works.
    let callee =
        control.spawn_meshed_proxy(&dirs, "payments", "shop", "payments", &token("payments"));
    dirs.write("checkout.yaml", &caller_doc(callee.inbound, PAYMENTS, "1s"));
    let caller =
        control.spawn_meshed_proxy(&dirs, "checkout", "shop", "checkout", &token("checkout"));
    callee.wait_ready().await;
    caller.wait_ready().await;
    callee.wait_policy(&app.addr.to_string()).await;
    caller.wait_policy(&callee.inbound.to_string()).await;
    let reply = get(caller.outbound, "payments", "/charge").await;
    assert_eq!(
        reply.status,
        200,
        "{}",
        String::from_utf8_lossy(&reply.body)
    );
    assert_eq!(reply.json()["headers"][IDENTITY_HEADER], CHECKOUT);

    // A pod running as checkout asks to be payments: its token gives it away.
    let impostor =
        control.spawn_meshed_proxy(&dirs, "payments", "shop", "payments", &token("checkout"));
    refused_with(
        &impostor,
        "the token is for service account shop/checkout, not shop/payments",
    )
    .await;
    // Without a token, with an expired one, or one minted for another audience: nothing.
    let tokenless = start_meshed(&control, &dirs, "payments", "payments");
    refused_with(&tokenless, "no service-account token").await;
    let expired = [
        "--identity-token-file".into(),
        issuer.token_file("shop", "payments", "outrider", -120),
    ];
    let expired = control.spawn_meshed_proxy(&dirs, "payments", "shop", "payments", &expired);
    refused_with(&expired, "xpired").await;
    let audience = [
        "--identity-token-file".into(),
        issuer.token_file("shop", "payments", "https://kubernetes.default.svc", 3600),
    ];
    let audience = control.spawn_meshed_proxy(&dirs, "payments", "shop", "payments", &audience);
    refused_with(&audience, "service-account token rejected").await;

    let refusals = control_logged(&control, "certificate refused");
    assert!(
        refusals >= 4,
        "{refusals} refusals logged by the control plane"
    );
    let issued = control_logged(&control, "certificate issued");
    assert_eq!(issued, 2, "only the two honest proxies were certified");
}

#[tokio::test]
async fn an_operators_intermediate_ca_signs_and_peers_trust_only_its_root() {
    // As an operator keeps a mesh CA: the root offline, an intermediate it signed given to the
    // control plane (--ca-cert holds the intermediate, then the root). The proxies' bundle is
    // the root alone, so every handshake below builds the path through the intermediate each
    // leaf carries.
    let ca_params = |name: &str, depth: u8| {
        let mut params = rcgen::CertificateParams::default();
        let mut dn = rcgen::DistinguishedName::new();
        dn.push(rcgen::DnType::CommonName, name);
        params.distinguished_name = dn;
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Constrained(depth));
        params.key_usages = vec![
            rcgen::KeyUsagePurpose::KeyCertSign,
            rcgen::KeyUsagePurpose::CrlSign,
        ];
        params
    };
    let root_key = rcgen::KeyPair::generate().unwrap();
    let root_params = ca_params("Operator root", 1);
    let root = root_params.self_signed(&root_key).unwrap();
    let root_issuer = rcgen::Issuer::new(root_params, root_key);
    let key = rcgen::KeyPair::generate().unwrap();
    let intermediate = ca_params("Operator mesh intermediate", 0)
        .signed_by(&key, &root_issuer)
        .unwrap();
    let files = TempDir::new();
    let (cert_file, key_file) = (files.path.join("ca.crt"), files.path.join("ca.key"));
    std::fs::write(&cert_file, format!("{}{}", intermediate.pem(), root.pem())).unwrap();
    std::fs::write(&key_file, key.serialize_pem()).unwrap();

    let mesh = start_mesh_with(
        PAYMENTS,
        "strict",
        &[
            "--ca-cert",
            cert_file.to_str().unwrap(),
            "--ca-key",
            key_file.to_str().unwrap(),
        ],
    )
    .await;
    let reply = get(mesh.caller.outbound, "payments", "/charge").await;
    assert_eq!(
        reply.status,
        200,
        "{:?}\ncaller logs:\n{}",
        reply.header("x-outrider-error"),
        mesh.caller.logs().join("\n")
    );
    assert_eq!(reply.json()["headers"][IDENTITY_HEADER], CHECKOUT);
    assert_eq!(mesh.app.hits(), 1);
    // The control plane kept the operator's CA: it generated none of its own.
    assert!(!mesh.dirs.state.join("ca.key").exists());

    // What it hands out: the leaf with the intermediate after it, and the root alone to trust.
    let csr_key = rcgen::KeyPair::generate().unwrap();
    let csr = rcgen::CertificateParams::default()
        .serialize_request(&csr_key)
        .unwrap()
        .pem()
        .unwrap();
    let body = serde_json::json!({ "csr": csr, "namespace": "shop", "service_account": "audit" });
    let reply = mesh
        .control
        .request("POST", "/v1/certificate", &body.to_string())
        .await;
    assert_eq!(
        reply.status,
        200,
        "{}",
        String::from_utf8_lossy(&reply.body)
    );
    let issued = reply.json();
    let certs = |field: &str| {
        issued[field]
            .as_str()
            .unwrap()
            .matches("BEGIN CERTIFICATE")
            .count()
    };
    assert_eq!(certs("chain"), 2, "leaf and intermediate");
    assert!(issued["chain"]
        .as_str()
        .unwrap()
        .ends_with(&intermediate.pem()));
    assert_eq!(issued["trust_bundle"].as_str().unwrap(), root.pem());
}

#[tokio::test]
async fn the_ca_refuses_a_namespace_or_service_account_that_is_not_a_kubernetes_name() {
    let dirs = ControlDirs::new();
    let control = start_control(&dirs);
    let csr_key = rcgen::KeyPair::generate().unwrap();
    let csr = rcgen::CertificateParams::default()
        .serialize_request(&csr_key)
        .unwrap()
        .pem()
        .unwrap();
    // `..` once became spiffe://cluster.local/ns/../sa/x.
    for (namespace, service_account) in [("..", "x"), ("shop", "%2e%2e"), ("shop", "")] {
        let body = serde_json::json!({
            "csr": csr,
            "namespace": namespace,
            "service_account": service_account,
        });
        let reply = control
            .request("POST", "/v1/certificate", &body.to_string())
            .await;
        let text = String::from_utf8_lossy(&reply.body);
        assert_eq!(reply.status, 400, "{namespace}/{service_account}: {text}");
        assert!(text.contains("must be a DNS-1123 label"), "{text}");
    }
    // A Kubernetes name is still certified.
    let body = serde_json::json!({ "csr": csr, "namespace": "shop", "service_account": "audit" });
    let reply = control
        .request("POST", "/v1/certificate", &body.to_string())
        .await;
    assert_eq!(
        reply.status,
        200,
        "{}",
        String::from_utf8_lossy(&reply.body)
    );
    assert!(reply.json()["identity"]
        .as_str()
        .unwrap()
        .ends_with("/ns/shop/sa/audit"));
}
