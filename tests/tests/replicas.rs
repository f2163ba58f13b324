//! Control-plane replicas on etcd, end to end: a real 3-member etcd cluster (Debian's
//! `etcd-server`) on loopback ports, two real `outrider-control` replicas on it
//! (`--store etcd://...`), real proxies and upstreams. An apply on one replica reaches a proxy
//! subscribed to the other; concurrent applies on both get distinct consecutive versions and
//! both documents survive; the generated CA is shared (mTLS between proxies certified by
//! different replicas); one etcd member lost changes nothing; two lost make applies fail at
//! once (exit 75) while proxies keep their policy, traffic and certificate renewals, neither
//! replica leads and each says its view is stale; the members' return converges without
//! restarting a replica.
//! Skipped when etcd is not installed, unless OUTRIDER_REQUIRE_ETCD=1.

#![allow(clippy::unwrap_used, missing_docs)]

use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use outrider_e2e::control::{
    applied_version, start_control_with, Control, ControlDirs, CONTROL_TOKEN,
};
use outrider_e2e::etcd::EtcdCluster;
use outrider_e2e::*;

const CHECKOUT: &str = "spiffe://cluster.local/ns/shop/sa/checkout";
const PAYMENTS: &str = "spiffe://cluster.local/ns/shop/sa/payments";
/// What `outriderctl` exits with when the store is unavailable (cli.rs, README).
const EX_STORE_UNAVAILABLE: i32 = 75;

/// A replica on `cluster`, with its own (empty) policy directory. Its etcd deadline leaves
/// room for a leader election (1 s to 2 s with the cluster's timeouts) on a loaded machine:
/// losing one member, the leader included, must delay a change, not fail it.
fn replica(cluster: &EtcdCluster, dirs: &ControlDirs) -> Control {
    replica_with(cluster, dirs, &[])
}

/// [`replica`] with `extra` flags.
fn replica_with(cluster: &EtcdCluster, dirs: &ControlDirs, extra: &[&str]) -> Control {
    let url = cluster.url();
    let mut flags = vec![
        "--store",
        &url,
        "--etcd-timeout",
        "5s",
        "--view-stale-after",
        "1s",
        "--lease-ttl",
        "2s",
    ];
    flags.extend_from_slice(extra);
    start_control_with(dirs, &flags)
}

/// How many certificates `proxy` has installed (its first and each renewal).
fn certificates_installed(proxy: &Proxy) -> usize {
    proxy
        .logs()
        .iter()
        .filter(|l| l.contains("workload certificate in force"))
        .count()
}

/// A proxy for `workload` subscribed to `control`, with a mesh identity (service account
/// named as the workload).
fn proxy_on(control: &Control, dirs: &ControlDirs, workload: &str) -> Proxy {
    let mut args = control.proxy_flags(dirs, workload);
    args.extend([
        "--namespace".into(),
        "shop".into(),
        "--service-account".into(),
        workload.into(),
    ]);
    spawn_proxy(TempDir::new(), &args)
}

/// Waits until `proxy` runs a policy whose `/config` contains `needle`; returns how long.
async fn wait_policy(proxy: &Proxy, needle: &str) -> Duration {
    let started = Instant::now();
    loop {
        let (_, config) = proxy.admin_get("/config").await;
        if config.contains(needle) {
            return started.elapsed();
        }
        assert!(
            started.elapsed() < Duration::from_secs(15),
            "policy with {needle} never arrived: {config}\nlogs:\n{}",
            proxy.logs().join("\n")
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// `outriderctl apply -f` of `text` (written as `name` in `dir`) against `control`, off the
/// async threads; returns the output and how long it took.
async fn apply(
    control: &Control,
    dir: &Path,
    name: &str,
    text: &str,
) -> (std::process::Output, Duration) {
    let file = dir.join(name);
    std::fs::write(&file, text).unwrap();
    let url = control.url();
    tokio::task::spawn_blocking(move || {
        let started = Instant::now();
        let out = outrider_e2e::control::ctl(
            &url,
            Some(CONTROL_TOKEN),
            &["apply", "-f", file.to_str().unwrap()],
        );
        (out, started.elapsed())
    })
    .await
    .unwrap()
}

/// The newest history entry as a replica reports it.
async fn newest(control: &Control) -> serde_json::Value {
    let reply = control.request("GET", "/v1/history", "").await;
    assert_eq!(reply.status, 200);
    reply.json()[0].clone()
}

/// `/ready`'s body.
async fn ready(control: &Control) -> String {
    let reply = control.request_with_token("GET", "/ready", "", None).await;
    assert_eq!(reply.status, 200);
    String::from_utf8_lossy(&reply.body).into_owned()
}

async fn server_of(addr: SocketAddr) -> String {
    let reply = get(addr, "svc", "/").await;
    assert_eq!(
        reply.status,
        200,
        "{:?}",
        String::from_utf8_lossy(&reply.body)
    );
    reply.json()["server"].as_str().unwrap().to_string()
}

/// Routes host `svc` of workload `checkout` to the upstream at `addr`.
fn route(addr: SocketAddr) -> String {
    format!(
        "workload: checkout
services:
  up: {{ endpoints: [{addr}] }}
routes:
  - match: {{ authority: svc }}
    service: up
"
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_share_documents_versions_and_the_ca() {
    let Some(cluster) = EtcdCluster::start(3) else {
        return;
    };
    let (dirs_a, dirs_b) = (ControlDirs::new(), ControlDirs::new());
    let a = replica(&cluster, &dirs_a);
    let b = replica(&cluster, &dirs_b);
    let docs = TempDir::new();

    // The callee's policy is applied on A; the callee proxy is subscribed to B and gets its
    // certificate from B. The caller is subscribed to A, certified by A.
    let app = Upstream::echo(Proto::Http1, "payments-app").await;
    let callee = proxy_on(&b, &dirs_b, "payments");
    let callee_doc = format!(
        "workload: payments\ninbound:\n  app: {}\n  mtls: strict\n  authorization: {{ allow: [{CHECKOUT}] }}\n",
        app.addr
    );
    let (out, _) = apply(&a, &docs.path, "payments.yaml", &callee_doc).await;
    applied_version(&out);
    let took = wait_policy(&callee, &app.addr.to_string()).await;
    eprintln!("apply on replica A -> proxy on replica B runs it: {took:?}");

    let caller = proxy_on(&a, &dirs_a, "checkout");
    let caller_doc = format!(
        "workload: checkout
services:
  payments:
    endpoints: [{}]
    tls: mesh
    identity: {PAYMENTS}
routes:
  - match: {{ authority: payments }}
    service: payments
",
        callee.inbound
    );
    let (out, _) = apply(&b, &docs.path, "checkout.yaml", &caller_doc).await;
    applied_version(&out);
    wait_policy(&caller, &callee.inbound.to_string()).await;

    // One CA: the caller's certificate (from A) is verified by the callee against B's root,
    // and the callee's (from B) by the caller against A's.
    let reply = get(caller.outbound, "payments", "/charge").await;
    assert_eq!(
        reply.status,
        200,
        "{}\ncaller:\n{}\ncallee:\n{}",
        String::from_utf8_lossy(&reply.body),
        caller.logs().join("\n"),
        callee.logs().join("\n")
    );
    assert_eq!(
        reply.json()["headers"]["x-outrider-peer-identity"],
        CHECKOUT
    );

    // Concurrent applies on A and B: both accepted, distinct consecutive versions, and the
    // newest version on each replica holds both documents.
    let before = newest(&a).await["version"].as_u64().unwrap();
    let doc = |w: &str| format!("workload: {w}\nservices: {{}}\n");
    let (one, two) = (doc("one"), doc("two"));
    let (on_a, on_b) = tokio::join!(
        apply(&a, &docs.path, "one.yaml", &one),
        apply(&b, &docs.path, "two.yaml", &two),
    );
    let mut versions = [applied_version(&on_a.0), applied_version(&on_b.0)];
    versions.sort_unstable();
    assert_eq!(versions, [before + 1, before + 2], "{before}");
    for replica in [&a, &b] {
        let mut caught_up = false;
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if newest(replica).await["version"] == before + 2 {
                caught_up = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(caught_up, "{}", replica.logs().join("\n"));
        let documents = newest(replica).await["documents"].clone();
        let names: Vec<&str> = documents
            .as_array()
            .unwrap()
            .iter()
            .map(|d| d.as_str().unwrap())
            .collect();
        assert_eq!(
            names,
            ["checkout.yaml", "one.yaml", "payments.yaml", "two.yaml"]
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn losing_the_etcd_quorum_makes_replicas_read_only_and_its_return_converges() {
    let Some(mut cluster) = EtcdCluster::start(3) else {
        return;
    };
    let (dirs_a, dirs_b) = (ControlDirs::new(), ControlDirs::new());
    // Certificates of 4 s: proxies renew them every 2.8 s, also while etcd has no quorum.
    let a = replica_with(&cluster, &dirs_a, &["--cert-ttl", "4s"]);
    let b = replica_with(&cluster, &dirs_b, &["--cert-ttl", "4s"]);
    let docs = TempDir::new();
    let up_a = Upstream::echo(Proto::Http1, "a").await;
    let up_b = Upstream::echo(Proto::Http1, "b").await;
    let (out, _) = apply(&a, &docs.path, "route.yaml", &route(up_a.addr)).await;
    applied_version(&out);
    let proxy = proxy_on(&b, &dirs_b, "checkout");
    wait_policy(&proxy, &up_a.addr.to_string()).await;
    assert_eq!(server_of(proxy.outbound).await, "a");

    // One member lost: the next apply works, and reaches the proxy on the other replica.
    cluster.kill(0);
    let (out, _) = apply(&a, &docs.path, "route.yaml", &route(up_b.addr)).await;
    let v = applied_version(&out);
    wait_policy(&proxy, &up_b.addr.to_string()).await;
    assert_eq!(server_of(proxy.outbound).await, "b");

    // Two lost: no quorum. Once a replica has noticed, an apply fails at once with its own
    // exit code and a clear message; nothing changes.
    cluster.kill(1);
    for replica in [&a, &b] {
        assert!(
            replica.wait_log(Duration::from_secs(30), |l| l.contains("etcd unavailable")),
            "{}",
            replica.logs().join("\n")
        );
    }
    for replica in [&a, &b] {
        let (out, took) = apply(replica, &docs.path, "route.yaml", &route(up_a.addr)).await;
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(EX_STORE_UNAVAILABLE), "{stderr}");
        assert!(
            stderr.contains("the store is unavailable, so this replica is read-only"),
            "{stderr}"
        );
        assert!(took < Duration::from_secs(1), "{took:?}");
    }
    // Each says its view is stale, in `/ready` and in `status`; neither leads any more (its
    // lease cannot be kept alive), so neither imports its policy directory.
    for replica in [&a, &b] {
        let ready = ready(replica).await;
        assert!(ready.contains(" view=stale view_behind="), "{ready}");
        assert!(ready.contains(" leader=false"), "{ready}");
        let out = replica.ctl(&["status"]);
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(text.contains("\nview STALE: behind etcd for "), "{text}");
    }
    // Proxies keep their policy and traffic flows, and renew their certificates; a new proxy
    // subscribing to a replica gets the policy from its last view, certificate included.
    for _ in 0..20 {
        assert_eq!(server_of(proxy.outbound).await, "b");
    }
    let installed = certificates_installed(&proxy);
    assert!(
        eventually(Duration::from_secs(10), || certificates_installed(&proxy)
            > installed)
        .await,
        "no certificate renewed without quorum:\n{}",
        proxy.logs().join("\n")
    );
    let late = proxy_on(&a, &dirs_a, "checkout");
    wait_policy(&late, &up_b.addr.to_string()).await;
    assert_eq!(server_of(late.outbound).await, "b");
    let (_, identity) = late.admin_get("/identity").await;
    assert!(identity.contains(CHECKOUT), "{identity}");

    // The members return: both replicas take changes again without a restart, and the
    // change reaches proxies on either.
    cluster.restart(0);
    cluster.restart(1);
    cluster.wait_healthy(&[0, 1, 2]);
    for replica in [&a, &b] {
        assert!(
            replica.wait_log(Duration::from_secs(30), |l| l
                .contains("etcd available again")),
            "{}",
            replica.logs().join("\n")
        );
    }
    for replica in [&a, &b] {
        let ready = ready(replica).await;
        assert!(!ready.contains("view=stale"), "{ready}");
    }
    // One of them leads again.
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let (on_a, on_b) = (ready(&a).await, ready(&b).await);
        let leaders = [&on_a, &on_b]
            .iter()
            .filter(|r| r.contains(" leader=true"))
            .count();
        if leaders == 1 {
            break;
        }
        assert!(Instant::now() < deadline, "{on_a}{on_b}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (out, _) = apply(&b, &docs.path, "route.yaml", &route(up_a.addr)).await;
    assert_eq!(applied_version(&out), v + 1);
    wait_policy(&proxy, &up_a.addr.to_string()).await;
    wait_policy(&late, &up_a.addr.to_string()).await;
    assert_eq!(server_of(proxy.outbound).await, "a");
    assert_eq!(server_of(late.outbound).await, "a");
}
