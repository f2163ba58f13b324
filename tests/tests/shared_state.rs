//! What control-plane replicas share through etcd, end to end with the real binaries on a real
//! 3-member etcd cluster (Debian's `etcd-server`) on loopback ports: a rejection recorded
//! through one replica is shown by every other, by one started later, and after its own replica
//! was killed; losing the etcd leader (SIGKILL) under continuous traffic through three proxies
//! and continuous applies fails no request and no apply, and keeps versions one consecutive
//! sequence; a subscription to a replica whose view lags behind the version the proxy runs is
//! pushed no older version; a deregistration sent to another replica than the one that took
//! the registration removes it everywhere at once, not at the registration TTL.
//! Skipped when etcd is not installed, unless OUTRIDER_REQUIRE_ETCD=1.

#![allow(clippy::unwrap_used, missing_docs)]

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use outrider_e2e::control::{start_control_with, Control, ControlDirs, CONTROL_TOKEN};
use outrider_e2e::etcd::EtcdCluster;
use outrider_e2e::prometheus::{promtool_check, sample};
use outrider_e2e::*;

/// A replica on `cluster` with its own (empty) policy directory: an etcd deadline that leaves
/// room for a leader election on a loaded machine, and `extra` flags.
fn replica(cluster: &EtcdCluster, extra: &[&str]) -> (Control, ControlDirs) {
    let dirs = ControlDirs::new();
    let url = cluster.url();
    let mut flags = vec!["--store", &url, "--etcd-timeout", "5s", "--lease-ttl", "2s"];
    flags.extend_from_slice(extra);
    let control = start_control_with(&dirs, &flags);
    (control, dirs)
}

/// Polls `cond` every 10 ms until it holds (true) or `timeout` passes (false).
async fn until<F: std::future::Future<Output = bool>>(
    timeout: Duration,
    mut cond: impl FnMut() -> F,
) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if cond().await {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// `POST /v1/apply` of `text` as document `name` on `url`: the status and the answer.
async fn apply_api(url: &str, name: &str, text: &str) -> (u16, serde_json::Value) {
    let req = http::Request::post(format!("{url}/v1/apply?name={name}"))
        .header("authorization", format!("Bearer {CONTROL_TOKEN}"))
        .body(full(text.to_string()))
        .unwrap();
    let reply = tokio::time::timeout(Duration::from_secs(15), send(&http1_client(), req))
        .await
        .unwrap_or_else(|_| panic!("apply on {url}: no answer within 15s"));
    let body = serde_json::from_slice(&reply.body).unwrap_or_else(|_| {
        serde_json::Value::String(String::from_utf8_lossy(&reply.body).into_owned())
    });
    (reply.status, body)
}

/// The version an accepted apply made; panics with the answer otherwise.
async fn applied(url: &str, name: &str, text: &str) -> (u64, serde_json::Value) {
    let (status, body) = apply_api(url, name, text).await;
    assert_eq!(status, 200, "apply {name} on {url}: {body}");
    (body["version"].as_u64().unwrap(), body)
}

/// `document`'s rejection as `control`'s status shows it, if any.
async fn rejection(control: &Control, document: &str) -> Option<serde_json::Value> {
    let status = control.status().await;
    status["documents"]
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["name"] == document)
        .map(|d| d["rejected"].clone())
        .filter(|r| !r.is_null())
}

/// Polls `control` until `pred` holds for `document`'s rejection, at most 10 s.
async fn wait_rejection(
    control: &Control,
    document: &str,
    what: &str,
    pred: impl Fn(&Option<serde_json::Value>) -> bool,
) -> Option<serde_json::Value> {
    let started = Instant::now();
    loop {
        let found = rejection(control, document).await;
        if pred(&found) {
            return found;
        }
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "{what}: {found:?}\nlogs:\n{}",
            control.logs().join("\n")
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rejection_is_every_replicas_and_outlives_the_replica_that_recorded_it() {
    let Some(cluster) = EtcdCluster::start(3) else {
        return;
    };
    let (one, _d1) = replica(&cluster, &[]);
    let (two, _d2) = replica(&cluster, &[]);
    let (three, _d3) = replica(&cluster, &[]);
    let (version, _) = applied(&one.url(), "good", "workload: w\nservices: {}\n").await;

    // Rejected through replica 1: the client is told, no version is made.
    let (status, answer) = apply_api(&one.url(), "bad", "workload: w\nservices: [\n").await;
    assert_eq!(status, 422, "{answer}");
    let recorded = rejection(&one, "bad").await.expect("replica 1 shows it");
    assert_eq!(recorded["message"], answer["message"]);

    // Replica 3 shows the same rejection, at the same version.
    let seen = wait_rejection(&three, "bad", "replica 3 never showed it", Option::is_some).await;
    assert_eq!(seen.as_ref(), Some(&recorded));
    assert_eq!(three.status().await["version"], version);

    // Replica 1 crashes: the others still show it, and so does a replica started afterwards.
    one.kill();
    assert_eq!(rejection(&two, "bad").await.as_ref(), Some(&recorded));
    assert_eq!(rejection(&three, "bad").await.as_ref(), Some(&recorded));
    let (four, _d4) = replica(&cluster, &[]);
    assert_eq!(rejection(&four, "bad").await.as_ref(), Some(&recorded));

    // Accepted through replica 2: gone from every replica.
    let (fixed, _) = applied(&two.url(), "bad", "workload: v\nservices: {}\n").await;
    assert_eq!(fixed, version + 1);
    for control in [&two, &three, &four] {
        wait_rejection(control, "bad", "the rejection stayed", Option::is_none).await;
    }
}

/// Routes host `svc` of workload `checkout` to `addr`; `step` makes each a new version.
fn route_step(addr: SocketAddr, step: u32) -> String {
    format!(
        "workload: checkout
services:
  up: {{ endpoints: [{addr}] }}
  spare: {{ endpoints: [127.0.0.1:{}] }}
routes:
  - match: {{ authority: svc }}
    service: up
",
        10_000 + step
    )
}

/// Requests to host `svc` through a proxy's outbound port, one after another until stopped;
/// every one that did not get a 200, and how many were sent.
struct Traffic {
    sent: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<Vec<String>>,
}

impl Traffic {
    fn start(outbound: SocketAddr) -> Self {
        let (sent, stop) = (
            Arc::new(AtomicUsize::new(0)),
            Arc::new(AtomicBool::new(false)),
        );
        let (counter, stopped) = (Arc::clone(&sent), Arc::clone(&stop));
        let task = tokio::spawn(async move {
            let client = http1_client();
            let mut failed = Vec::new();
            while !stopped.load(Ordering::Acquire) {
                let req = http::Request::get(format!("http://{outbound}/"))
                    .header("host", "svc")
                    .body(empty())
                    .unwrap();
                match tokio::time::timeout(Duration::from_secs(5), client.request(req)).await {
                    Ok(Ok(res)) if res.status() == 200 => {}
                    Ok(Ok(res)) => failed.push(format!("status {}", res.status())),
                    Ok(Err(e)) => failed.push(format!("error {e}")),
                    Err(_) => failed.push("no answer within 5s".into()),
                }
                counter.fetch_add(1, Ordering::AcqRel);
                // A steady stream, not a flood: three of these share two cores with etcd.
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            failed
        });
        Self { sent, stop, task }
    }

    fn sent(&self) -> usize {
        self.sent.load(Ordering::Acquire)
    }

    async fn stop(self) -> (usize, Vec<String>) {
        self.stop.store(true, Ordering::Release);
        let failed = self.task.await.unwrap();
        (self.sent.load(Ordering::Acquire), failed)
    }
}

/// The version `proxy` runs (from `/config`).
async fn running(proxy: &Proxy) -> u64 {
    let (_, body) = proxy.admin_get("/config").await;
    let config: serde_json::Value = serde_json::from_str(&body).unwrap();
    config["version"].as_u64().unwrap_or(0)
}

/// Applies, one after another, before and after the kill.
const APPLIES: u32 = 30;
const KILL_AFTER: u32 = 10;
/// Longest one apply may take: a leader election (1 s to 2 s with the cluster's timeouts)
/// and the client's retry through another member, on a loaded machine.
const APPLY_BOUND: Duration = Duration::from_secs(5);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn losing_the_etcd_leader_under_traffic_and_applies_interrupts_nothing() {
    let Some(mut cluster) = EtcdCluster::start(3) else {
        return;
    };
    let replicas: Vec<(Control, ControlDirs)> = (0..3).map(|_| replica(&cluster, &[])).collect();
    let urls: Vec<String> = replicas.iter().map(|(c, _)| c.url()).collect();
    let up = Upstream::echo(Proto::Http1, "up").await;
    let (first, _) = applied(&urls[0], "checkout.yaml", &route_step(up.addr, 0)).await;

    // One proxy on each replica (the others to fail over to), traffic through each.
    let proxies: Vec<Proxy> = (0..3)
        .map(|i| {
            let mut order = urls.clone();
            order.rotate_left(i);
            let args: Vec<std::ffi::OsString> = vec![
                "--control".into(),
                order.join(",").into(),
                "--token-file".into(),
                replicas[i].1.token_file.clone().into(),
                "--workload".into(),
                "checkout".into(),
            ];
            spawn_proxy(TempDir::new(), &args)
        })
        .collect();
    for proxy in &proxies {
        assert!(
            until(Duration::from_secs(15), || async {
                running(proxy).await >= first
            })
            .await,
            "never ran version {first}:\n{}",
            proxy.logs().join("\n")
        );
    }
    let traffic: Vec<Traffic> = proxies.iter().map(|p| Traffic::start(p.outbound)).collect();

    // Applies through the replicas in turn; after KILL_AFTER of them the etcd leader is
    // SIGKILLed, and the applies go on.
    let killed_at: Arc<Mutex<Option<(usize, Instant)>>> = Arc::new(Mutex::new(None));
    let mut versions = Vec::new();
    let mut slowest = Duration::ZERO;
    for step in 1..=APPLIES {
        if step == KILL_AFTER + 1 {
            let leader = cluster.leader().expect("a leader");
            let sent: Vec<usize> = traffic.iter().map(Traffic::sent).collect();
            cluster.kill(leader);
            *killed_at.lock().unwrap() = Some((leader, Instant::now()));
            eprintln!("killed etcd member {leader}, the leader; requests so far {sent:?}");
        }
        let url = &urls[step as usize % 3];
        let started = Instant::now();
        let (version, _) = applied(url, "checkout.yaml", &route_step(up.addr, step)).await;
        let took = started.elapsed();
        slowest = slowest.max(took);
        assert!(
            took < APPLY_BOUND,
            "apply {step} on {url} took {took:?}, more than {APPLY_BOUND:?}"
        );
        versions.push(version);
    }
    let last = *versions.last().unwrap();
    assert_eq!(
        versions,
        (first + 1..=last).collect::<Vec<_>>(),
        "each apply its own consecutive version"
    );
    // A new leader among the two left.
    let (dead, at) = killed_at.lock().unwrap().unwrap();
    assert!(cluster.leader().is_some_and(|l| l != dead));

    // Every proxy converges on the last version, and no request failed.
    for proxy in &proxies {
        assert!(
            until(Duration::from_secs(10), || async {
                running(proxy).await == last
            })
            .await,
            "runs {} not {last}:\n{}",
            running(proxy).await,
            proxy.logs().join("\n")
        );
    }
    let mut total = 0;
    for t in traffic {
        let (sent, failed) = t.stop().await;
        assert!(
            failed.is_empty(),
            "{} of {sent} failed: {failed:?}",
            failed.len()
        );
        assert!(sent > 0);
        total += sent;
    }
    // Every replica's history holds every version.
    for url in &urls {
        let history = tokio::time::timeout(Duration::from_secs(10), async {
            let req = http::Request::get(format!("{url}/v1/history"))
                .header("authorization", format!("Bearer {CONTROL_TOKEN}"))
                .body(empty())
                .unwrap();
            send(&http1_client(), req).await.json()
        })
        .await
        .unwrap();
        let kept: Vec<u64> = history
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e["version"].as_u64().unwrap())
            .collect();
        assert!(versions.iter().all(|v| kept.contains(v)), "{url}: {kept:?}");
    }
    eprintln!(
        "etcd leader {dead} killed: {APPLIES} applies (slowest {slowest:?}), {total} requests through 3 proxies, 0 failed; converged {:?} after the kill",
        at.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscription_to_a_replica_whose_view_lags_is_pushed_no_older_version() {
    let Some(cluster) = EtcdCluster::start(3) else {
        return;
    };
    let (one, _d1) = replica(&cluster, &[]);
    let (three, _d3) = replica(&cluster, &[]);
    let doc = |step: u32| route_step(([127, 0, 0, 1], 9).into(), step);
    let hash_of = |answer: &serde_json::Value| {
        answer["workloads"]
            .as_array()
            .unwrap()
            .iter()
            .find(|w| w["workload"] == "checkout")
            .map(|w| w["content_hash"].as_str().unwrap().to_string())
            .unwrap()
    };

    // An apply on replica 1, and at once a subscription to replica 3 as a proxy that runs it
    // (one failing over from replica 1): whether or not replica 3's view has it yet, the proxy
    // is pushed nothing older; nothing at all, since it runs the newest.
    let (v1, answer) = applied(&one.url(), "checkout.yaml", &doc(1)).await;
    let mut sub = three
        .subscribe_resuming("checkout", "p1", &hash_of(&answer), v1)
        .await;
    if let Some(update) = sub.next_update(Duration::from_secs(1)).await {
        panic!("pushed version {} to a proxy running {v1}", update.version);
    }
    // The next version reaches it.
    let (v2, _) = applied(&one.url(), "checkout.yaml", &doc(2)).await;
    let update = sub.next_update(Duration::from_secs(10)).await.expect("v2");
    assert_eq!(update.version, v2);
    drop(sub);

    // A view that surely lags: the proxy runs a version replica 3 has not seen (none has yet).
    // Nothing is pushed until its view reaches it; then the new version, never v2.
    let mut sub = three
        .subscribe_resuming("checkout", "p2", "sha256:elsewhere", v2 + 1)
        .await;
    if let Some(update) = sub.next_update(Duration::from_secs(1)).await {
        panic!(
            "pushed version {} to a proxy running {}",
            update.version,
            v2 + 1
        );
    }
    assert!(
        three.wait_log(Duration::from_secs(5), |l| l
            .contains("proxy runs a newer version than this replica's view")),
        "{}",
        three.logs().join("\n")
    );
    let (v3, _) = applied(&one.url(), "checkout.yaml", &doc(3)).await;
    assert_eq!(v3, v2 + 1);
    let update = sub.next_update(Duration::from_secs(10)).await.expect("v3");
    assert_eq!(update.version, v3);
    drop(sub);

    // The lagging view has not seen the document that first names the proxy's workload: once
    // the view reaches the proxy's version, the proxy runs exactly what the view holds (same
    // content, and named), so nothing is pushed; the next change is.
    let fresh = |port: u16| {
        format!("workload: fresh\nservices: {{ s: {{ endpoints: [127.0.0.1:{port}] }} }}\n")
    };
    let (status, dry) = apply_api(&one.url(), "fresh.yaml&dry_run=1", &fresh(1)).await;
    assert_eq!(status, 200, "{dry}");
    let v4 = dry["version"].as_u64().unwrap();
    let hash = dry["workloads"]
        .as_array()
        .unwrap()
        .iter()
        .find(|w| w["workload"] == "fresh")
        .map(|w| w["content_hash"].as_str().unwrap().to_string())
        .expect("fresh changes");
    let mut sub = three.subscribe_resuming("fresh", "p3", &hash, v4).await;
    if let Some(update) = sub.next_update(Duration::from_secs(1)).await {
        panic!("pushed version {} before {v4} existed", update.version);
    }
    let (committed, _) = applied(&one.url(), "fresh.yaml", &fresh(1)).await;
    assert_eq!(committed, v4);
    if let Some(update) = sub.next_update(Duration::from_secs(2)).await {
        panic!(
            "pushed version {} (unselected: {}) to a proxy running it",
            update.version, update.unselected
        );
    }
    let (v5, _) = applied(&one.url(), "fresh.yaml", &fresh(2)).await;
    let update = sub.next_update(Duration::from_secs(10)).await.expect("v5");
    assert_eq!((update.version, update.unselected), (v5, false));
}

/// `POST path` of `body` to `control` (a proxy's registration or deregistration).
async fn post(control: &Control, path: &str, body: serde_json::Value) -> u16 {
    control
        .request("POST", path, &body.to_string())
        .await
        .status
}

/// `control`'s `outrider_control_registered_endpoints{service="pay"}` (0 when absent),
/// checked by promtool.
async fn pay_endpoints(control: &Control) -> f64 {
    let [pay] = registered_endpoints(control, ["pay"]).await;
    pay
}

/// `control`'s `outrider_control_registered_endpoints` of each of `services` (0 when absent),
/// read from one scrape, checked by promtool.
async fn registered_endpoints<const N: usize>(control: &Control, services: [&str; N]) -> [f64; N] {
    let reply = control
        .request_with_token("GET", "/metrics", "", None)
        .await;
    let text = String::from_utf8(reply.body.to_vec()).unwrap();
    promtool_check(&text);
    services.map(|service| {
        let name = format!("outrider_control_registered_endpoints{{service=\"{service}\"}}");
        sample(&text, &name).unwrap_or(0.0)
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deregistration_through_another_replica_removes_the_registration_everywhere() {
    let Some(cluster) = EtcdCluster::start(3) else {
        return;
    };
    // A registration TTL far beyond the bound below: a stale entry would stay that long.
    let ttl = ["--registration-ttl", "60s"];
    let (one, _d1) = replica(&cluster, &ttl);
    let (two, _d2) = replica(&cluster, &ttl);
    let (three, _d3) = replica(&cluster, &ttl);
    let registration = |proxy: &str, port: u16| serde_json::json!({"proxy": proxy, "services": ["pay"], "address": format!("127.0.0.1:{port}")});
    // pay-1 registers with replica 1, then (having moved) renews with replica 2 as well;
    // pay-2 stays with replica 3.
    assert_eq!(
        post(&one, "/v1/register", registration("pay-1", 7001)).await,
        200
    );
    assert_eq!(
        post(&two, "/v1/register", registration("pay-1", 7001)).await,
        200
    );
    assert_eq!(
        post(&three, "/v1/register", registration("pay-2", 7002)).await,
        200
    );
    for control in [&one, &two, &three] {
        assert!(
            until(Duration::from_secs(10), || async {
                pay_endpoints(control).await == 2.0
            })
            .await,
            "{}",
            control.logs().join("\n")
        );
    }

    // pay-1 drains through replica 3, which never held its registration: every replica
    // drops it within the push bound, long before the TTL.
    let sent = Instant::now();
    assert_eq!(
        post(
            &three,
            "/v1/deregister",
            serde_json::json!({"proxy": "pay-1"})
        )
        .await,
        204
    );
    for control in [&one, &two, &three] {
        assert!(
            until(Duration::from_secs(3), || async {
                pay_endpoints(control).await == 1.0
            })
            .await,
            "a stale registration stayed:\n{}",
            control.logs().join("\n")
        );
    }
    eprintln!(
        "deregistered through another replica: gone from all 3 after {:?}",
        sent.elapsed()
    );
    // And it stays gone: no replica writes it again (1 and 2 held it). Each replica writes
    // its registrations to etcd from one loop, in order, and follows the others' in etcd's
    // order; so a later registration through each (service `mark`), once all three are seen
    // by a replica, comes after any write of pay-1 a replica still had in it. In the scrape
    // that has all three, pay has only pay-2.
    let marks = [
        (&one, "mark-1", 7101),
        (&two, "mark-2", 7102),
        (&three, "mark-3", 7103),
    ];
    for (control, proxy, port) in marks {
        let mark = serde_json::json!({"proxy": proxy, "services": ["mark"], "address": format!("127.0.0.1:{port}")});
        assert_eq!(post(control, "/v1/register", mark).await, 200);
    }
    for control in [&one, &two, &three] {
        let deadline = Instant::now() + Duration::from_secs(10);
        let [mark, pay] = loop {
            let seen = registered_endpoints(control, ["mark", "pay"]).await;
            if seen[0] == 3.0 || Instant::now() >= deadline {
                break seen;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        };
        let logs = control.logs().join("\n");
        assert_eq!(mark, 3.0, "the later registrations did not arrive:\n{logs}");
        assert_eq!(pay, 1.0, "pay-1 came back:\n{logs}");
    }
}
