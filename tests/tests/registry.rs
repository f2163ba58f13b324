//! The service registry end to end (`discovery: registry`): the real `outrider-control` (state
//! directory, `--registration-ttl 2s`), three real `outrider-proxy` processes registered as
//! service `pay` (`--register pay`), each in front of its own real upstream, and a caller proxy
//! whose policy has `pay: { discovery: registry }`, all on 127.0.0.1. Under steady traffic
//! through the caller, one registered proxy drains (SIGTERM) and leaves the caller's pool before
//! its inbound port stops accepting, with no request failed and none retried; another is
//! killed with SIGKILL and leaves the caller's pool within the TTL and a push bound, with no
//! request failed (the caller's policy retries connect failures and resets, twice: the
//! requests sent to the dead endpoint before the TTL ran out need it). The same on three
//! control-plane replicas sharing a real 3-member etcd cluster, each registered proxy and the
//! caller on a different replica. And a control plane SIGKILLed and restarted under traffic
//! pushes no partial endpoint set (it waits a TTL for every proxy to renew).

#![allow(clippy::unwrap_used, missing_docs)]

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use http::Request;
use outrider_e2e::control::CONTROL_TOKEN;
use outrider_e2e::etcd::EtcdCluster;
use outrider_e2e::*;

/// The registration TTL the control plane is started with.
const TTL: Duration = Duration::from_secs(2);
/// From the control plane's expiry (or a deregistration) to the caller's pool changing: the
/// sweep (a tenth of the TTL) and the push, on a loaded 2-core machine.
const PUSH_BOUND: Duration = Duration::from_secs(1);

/// The caller's policy: `pay` from the registry, connect failures and resets retried twice
/// (the SIGKILL phase needs it; the drain phase is checked to use none).
const CALLER: &str = "workload: caller
services:
  pay:
    discovery: registry
    retries: { attempts: 2, on: [connect-failure, reset] }
routes:
  - match: { authority: pay }
    service: pay
";

/// The caller's view of `pay`: the endpoint counts it logged, in order.
fn pool_sizes(caller: &Proxy) -> Vec<u64> {
    caller
        .logs()
        .iter()
        .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
        .filter(|event| {
            event["message"] == "registry endpoints updated" && event["service"] == "pay"
        })
        .filter_map(|event| event["endpoints"].as_u64())
        .collect()
}

/// The sum of a counter's series for service `pay` on `proxy`'s `/metrics`.
async fn pay_counter(proxy: &Proxy, name: &str) -> f64 {
    let (_, text) = proxy.admin_get("/metrics").await;
    text.lines()
        .filter(|l| l.starts_with(&format!("{name}{{")) && l.contains("service=\"pay\""))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// A registered proxy: workload `name`, in front of `app`.
fn registered(control: &Control, dirs: &ControlDirs, name: &str) -> Proxy {
    let mut args = control.proxy_flags(dirs, name);
    args.extend(
        [
            "--proxy-id",
            name,
            "--register",
            "pay",
            "--deregister-delay",
            "2s",
        ]
        .iter()
        .map(Into::into),
    );
    spawn_proxy(TempDir::new(), &args)
}

/// Steady sequential traffic to `pay` through the caller until stopped: (ok, failures).
struct Traffic {
    stop: Arc<AtomicBool>,
    ok: Arc<AtomicUsize>,
    failures: Arc<Mutex<Vec<String>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Traffic {
    fn start(outbound: SocketAddr) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let ok = Arc::new(AtomicUsize::new(0));
        let failures = Arc::new(Mutex::new(Vec::new()));
        let task = tokio::spawn({
            let (stop, ok, failures) = (stop.clone(), ok.clone(), failures.clone());
            async move {
                let client = http1_client();
                while !stop.load(Ordering::SeqCst) {
                    let request = Request::get(format!("http://{outbound}/pay"))
                        .header("host", "pay")
                        .body(empty())
                        .unwrap();
                    let answer =
                        tokio::time::timeout(Duration::from_secs(5), client.request(request)).await;
                    match answer {
                        Ok(Ok(response)) if response.status() == 200 => {
                            ok.fetch_add(1, Ordering::SeqCst);
                        }
                        Ok(Ok(response)) => failures.lock().unwrap().push(format!(
                            "{} {:?}",
                            response.status(),
                            response.headers().get("x-outrider-error")
                        )),
                        Ok(Err(e)) => failures.lock().unwrap().push(e.to_string()),
                        Err(_) => failures.lock().unwrap().push("timed out".into()),
                    }
                }
            }
        });
        Self {
            stop,
            ok,
            failures,
            task,
        }
    }

    fn ok(&self) -> usize {
        self.ok.load(Ordering::SeqCst)
    }

    fn failures(&self) -> Vec<String> {
        self.failures.lock().unwrap().clone()
    }

    async fn stop(self) -> (usize, Vec<String>) {
        self.stop.store(true, Ordering::SeqCst);
        let Self {
            ok, failures, task, ..
        } = self;
        task.await.unwrap();
        let failures = failures.lock().unwrap().clone();
        (ok.load(Ordering::SeqCst), failures)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registered_proxies_leave_callers_pools_on_drain_and_on_death_without_a_failed_request() {
    let upstreams = [
        Upstream::echo(Proto::Http1, "pay-1").await,
        Upstream::echo(Proto::Http1, "pay-2").await,
        Upstream::echo(Proto::Http1, "pay-3").await,
    ];
    let dirs = ControlDirs::new();
    for (i, upstream) in upstreams.iter().enumerate() {
        let n = i + 1;
        dirs.write(
            &format!("pay-{n}.yaml"),
            &format!("workload: pay-{n}\ninbound: {{ app: {} }}\n", upstream.addr),
        );
    }
    // Retries on connect failures and resets: the SIGKILL phase needs them; the drain phase
    // is checked to use none.
    dirs.write("caller.yaml", CALLER);
    let control = start_control_with(&dirs, &["--registration-ttl", "2s"]);
    let caller = spawn_proxy(TempDir::new(), &control.proxy_flags(&dirs, "caller"));
    let pay_1 = registered(&control, &dirs, "pay-1");
    let mut pay_2 = registered(&control, &dirs, "pay-2");
    let pay_3 = registered(&control, &dirs, "pay-3");
    assert!(
        eventually(Duration::from_secs(10), || pool_sizes(&caller).last()
            == Some(&3))
        .await,
        "the caller never had 3 endpoints: {:?}; caller logs:\n{}\ncontrol logs:\n{}",
        pool_sizes(&caller),
        caller.logs().join("\n"),
        control.logs().join("\n")
    );

    // Every registered proxy takes traffic.
    let traffic = Traffic::start(caller.outbound);
    assert!(
        eventually(Duration::from_secs(10), || upstreams
            .iter()
            .all(|u| u.hits() > 0))
        .await,
        "not every upstream was reached: {:?}",
        upstreams.iter().map(Upstream::hits).collect::<Vec<_>>()
    );

    // Drain: pay-2 deregisters, the caller's pool drops it while pay-2 still accepts, and no
    // request fails or needs a retry.
    let retries_before = pay_counter(&caller, "outrider_retries_total").await;
    let sizes_before = pool_sizes(&caller).len();
    let sigterm = Instant::now();
    pay_2.terminate();
    assert!(
        eventually(Duration::from_secs(5), || pool_sizes(&caller).len()
            > sizes_before)
        .await,
        "the caller's pool did not change after pay-2's SIGTERM"
    );
    let drain_left = sigterm.elapsed();
    assert_eq!(pool_sizes(&caller).last(), Some(&2));
    // Left before it stopped taking traffic: its inbound port still accepts.
    assert!(
        tokio::net::TcpStream::connect(pay_2.inbound).await.is_ok(),
        "pay-2 stopped accepting before it left the caller's pool ({drain_left:?})"
    );
    assert_eq!(pay_2.wait_exit(Duration::from_secs(10)), Some(0));
    let hits_2 = upstreams[1].hits();
    let ok_at_exit = traffic.ok();
    assert!(
        eventually(Duration::from_secs(5), || traffic.ok() > ok_at_exit + 50).await,
        "traffic stalled after pay-2 exited"
    );
    assert_eq!(upstreams[1].hits(), hits_2, "pay-2 served after it exited");
    assert_eq!(traffic.failures(), Vec::<String>::new(), "during the drain");
    assert_eq!(
        pay_counter(&caller, "outrider_retries_total").await,
        retries_before,
        "the drain needed retries"
    );

    // SIGKILL: pay-3 leaves the caller's pool within the TTL and the push bound.
    let sizes_before = pool_sizes(&caller).len();
    let hits_3 = upstreams[2].hits();
    let killed = Instant::now();
    let status = std::process::Command::new("kill")
        .args(["-KILL", &pay_3.pid().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    assert!(
        eventually(TTL + PUSH_BOUND + Duration::from_secs(2), || pool_sizes(
            &caller
        )
        .len()
            > sizes_before)
        .await,
        "the caller's pool did not change after pay-3's SIGKILL; control logs:\n{}",
        control.logs().join("\n")
    );
    let death_left = killed.elapsed();
    assert_eq!(pool_sizes(&caller).last(), Some(&1));
    assert!(
        death_left <= TTL + PUSH_BOUND,
        "pay-3 left the caller's pool {death_left:?} after its death, more than the TTL {TTL:?} and the push bound {PUSH_BOUND:?}"
    );
    let ok_after = traffic.ok();
    assert!(
        eventually(Duration::from_secs(5), || traffic.ok() > ok_after + 50).await,
        "traffic stalled after pay-3 left"
    );
    let retried = pay_counter(&caller, "outrider_retries_total").await - retries_before;
    let (ok, failures) = traffic.stop().await;
    assert_eq!(failures, Vec::<String>::new(), "during the SIGKILL");
    eprintln!(
        "registry: drain left the caller's pool after {drain_left:?}; SIGKILL after {death_left:?} (TTL {TTL:?}); {ok} requests, 0 failed, {retried} retries (all after the SIGKILL); pay-3 hits before the kill {hits_3}"
    );
    drop(pay_1);
}

/// A control-plane replica on `cluster` with a 2 s registration TTL.
fn replica(cluster: &EtcdCluster) -> (Control, ControlDirs) {
    let dirs = ControlDirs::new();
    let url = cluster.url();
    let control = start_control_with(
        &dirs,
        &[
            "--store",
            &url,
            "--etcd-timeout",
            "5s",
            "--lease-ttl",
            "2s",
            "--registration-ttl",
            "2s",
        ],
    );
    (control, dirs)
}

/// Applies `text` through `control` with `outriderctl apply`.
async fn apply(control: &Control, name: &str, text: &str) {
    let dir = TempDir::new();
    let file = dir.path.join(name);
    std::fs::write(&file, text).unwrap();
    let url = control.url();
    let out = tokio::task::spawn_blocking(move || {
        outrider_e2e::control::ctl(
            &url,
            Some(CONTROL_TOKEN),
            &["apply", "-f", file.to_str().unwrap()],
        )
    })
    .await
    .unwrap();
    assert!(out.status.success(), "{out:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_etcd_registrations_on_any_replica_reach_callers_on_another() {
    let Some(cluster) = EtcdCluster::start(3) else {
        return;
    };
    let replicas = [replica(&cluster), replica(&cluster), replica(&cluster)];
    let upstreams = [
        Upstream::echo(Proto::Http1, "pay-1").await,
        Upstream::echo(Proto::Http1, "pay-2").await,
        Upstream::echo(Proto::Http1, "pay-3").await,
    ];
    for (i, upstream) in upstreams.iter().enumerate() {
        let n = i + 1;
        let doc = format!("workload: pay-{n}\ninbound: {{ app: {} }}\n", upstream.addr);
        apply(&replicas[0].0, &format!("pay-{n}.yaml"), &doc).await;
    }
    apply(&replicas[0].0, "caller.yaml", CALLER).await;
    // pay-1 registers with replica 0, pay-2 with replica 1, pay-3 and the caller use replica 2.
    let pay_1 = registered(&replicas[0].0, &replicas[0].1, "pay-1");
    let mut pay_2 = registered(&replicas[1].0, &replicas[1].1, "pay-2");
    let _pay_3 = registered(&replicas[2].0, &replicas[2].1, "pay-3");
    let caller = spawn_proxy(
        TempDir::new(),
        &replicas[2].0.proxy_flags(&replicas[2].1, "caller"),
    );
    assert!(
        eventually(Duration::from_secs(15), || pool_sizes(&caller).last()
            == Some(&3))
        .await,
        "the caller never had 3 endpoints: {:?}; caller logs:\n{}",
        pool_sizes(&caller),
        caller.logs().join("\n")
    );
    let traffic = Traffic::start(caller.outbound);
    assert!(
        eventually(Duration::from_secs(10), || upstreams
            .iter()
            .all(|u| u.hits() > 0))
        .await,
        "not every upstream was reached: {:?}",
        upstreams.iter().map(Upstream::hits).collect::<Vec<_>>()
    );

    // pay-1 dies: replica 0 expires it, and the caller on replica 2 hears of it via etcd.
    let sizes_before = pool_sizes(&caller).len();
    let killed = Instant::now();
    let status = std::process::Command::new("kill")
        .args(["-KILL", &pay_1.pid().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    assert!(
        eventually(TTL + PUSH_BOUND + Duration::from_secs(2), || pool_sizes(
            &caller
        )
        .len()
            > sizes_before)
        .await,
        "the caller's pool did not change after pay-1's SIGKILL"
    );
    let death_left = killed.elapsed();
    assert_eq!(pool_sizes(&caller).last(), Some(&2));
    assert!(
        death_left <= TTL + PUSH_BOUND,
        "pay-1 left the caller's pool {death_left:?} after its death"
    );

    // pay-2 drains: deregistered on replica 1, gone from the caller's pool while it accepts.
    let retries_before = pay_counter(&caller, "outrider_retries_total").await;
    let sizes_before = pool_sizes(&caller).len();
    let sigterm = Instant::now();
    pay_2.terminate();
    assert!(
        eventually(Duration::from_secs(5), || pool_sizes(&caller).len()
            > sizes_before)
        .await,
        "the caller's pool did not change after pay-2's SIGTERM"
    );
    let drain_left = sigterm.elapsed();
    assert_eq!(pool_sizes(&caller).last(), Some(&1));
    assert!(
        tokio::net::TcpStream::connect(pay_2.inbound).await.is_ok(),
        "pay-2 stopped accepting before it left the caller's pool ({drain_left:?})"
    );
    assert_eq!(pay_2.wait_exit(Duration::from_secs(10)), Some(0));
    let ok_at_exit = traffic.ok();
    assert!(
        eventually(Duration::from_secs(5), || traffic.ok() > ok_at_exit + 50).await,
        "traffic stalled after pay-2 exited"
    );
    assert_eq!(
        pay_counter(&caller, "outrider_retries_total").await,
        retries_before,
        "the drain needed retries"
    );
    let (ok, failures) = traffic.stop().await;
    assert_eq!(failures, Vec::<String>::new());
    eprintln!(
        "registry on etcd: SIGKILL left the caller's pool after {death_left:?} (TTL {TTL:?}); drain after {drain_left:?}; {ok} requests, 0 failed"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_control_plane_does_not_empty_callers_pools() {
    let upstreams = [
        Upstream::echo(Proto::Http1, "pay-1").await,
        Upstream::echo(Proto::Http1, "pay-2").await,
    ];
    let dirs = ControlDirs::new();
    for (i, upstream) in upstreams.iter().enumerate() {
        let n = i + 1;
        dirs.write(
            &format!("pay-{n}.yaml"),
            &format!("workload: pay-{n}\ninbound: {{ app: {} }}\n", upstream.addr),
        );
    }
    dirs.write("caller.yaml", CALLER);
    let control = start_control_with(&dirs, &["--registration-ttl", "2s"]);
    let listen = control.addr.to_string();
    let caller = spawn_proxy(TempDir::new(), &control.proxy_flags(&dirs, "caller"));
    let _pay_1 = registered(&control, &dirs, "pay-1");
    let _pay_2 = registered(&control, &dirs, "pay-2");
    assert!(
        eventually(Duration::from_secs(10), || pool_sizes(&caller).last()
            == Some(&2))
        .await,
        "the caller never had 2 endpoints: {:?}",
        pool_sizes(&caller)
    );
    let traffic = Traffic::start(caller.outbound);

    // The control plane dies and comes back empty: until every proxy has renewed with it (a
    // TTL), it pushes no endpoints, so the caller keeps both.
    let before = pool_sizes(&caller).len();
    control.kill();
    let control = start_control_with(&dirs, &["--registration-ttl", "2s", "--listen", &listen]);
    assert!(
        eventually(TTL + PUSH_BOUND + Duration::from_secs(5), || pool_sizes(
            &caller
        )
        .len()
            > before)
        .await,
        "no endpoints pushed after the restart; control logs:\n{}",
        control.logs().join("\n")
    );
    assert_eq!(
        pool_sizes(&caller)[before..],
        [2],
        "the restarted control plane pushed a partial set"
    );
    let ok_now = traffic.ok();
    assert!(
        eventually(Duration::from_secs(5), || traffic.ok() > ok_now + 50).await,
        "traffic stalled"
    );
    let (ok, failures) = traffic.stop().await;
    assert_eq!(failures, Vec::<String>::new());
    eprintln!("registry: control-plane restart under {ok} requests, 0 failed");
}
