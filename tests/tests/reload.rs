//! `--policy FILE` hot reload, end to end: the real binary watches its policy file; saving a
//! new version changes routing, an invalid save changes nothing, dedicated ports come and go
//! (a taken port keeps the old policy), requests in flight finish under the policy they
//! started with, and 100 reloads under steady load lose no request, nor do saves that truncate
//! the file first and write it a moment later.

#![allow(clippy::unwrap_used, missing_docs)]

use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use http::{Request, Response};
use outrider_e2e::*;

/// Routes host `svc` to `service` (`a` or `b`); both services exist.
fn routing(a: SocketAddr, b: SocketAddr, service: &str) -> String {
    format!(
        "services:
  a: {{ endpoints: [{a}] }}
  b: {{ endpoints: [{b}] }}
routes:
  - match: {{ authority: svc }}
    service: {service}
"
    )
}

/// Saves `text` the way editors do: a new file renamed over the old one.
fn save(path: &Path, text: &str) {
    let tmp = path.with_extension("yaml.swp");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

async fn config(proxy: &Proxy) -> serde_json::Value {
    let (status, body) = proxy.admin_get("/config").await;
    assert_eq!(status, 200);
    serde_json::from_str(&body).unwrap()
}

/// Waits until the proxy reports policy `version`; returns how long that took.
async fn wait_version(proxy: &Proxy, version: u64) -> Duration {
    let started = Instant::now();
    let deadline = started + Duration::from_secs(10);
    loop {
        let current = config(proxy).await["version"].as_u64().unwrap();
        if current == version {
            return started.elapsed();
        }
        assert!(
            Instant::now() < deadline,
            "version {version} never applied (at {current}); logs:\n{}",
            proxy.logs().join("\n")
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

async fn server_of(addr: SocketAddr) -> String {
    let reply = get(addr, "svc", "/").await;
    assert_eq!(reply.status, 200, "{:?}", reply.body);
    reply.json()["server"].as_str().unwrap().to_string()
}

/// A port nothing listens on right now.
fn free_port() -> SocketAddr {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn saving_the_file_changes_routing() {
    let a = Upstream::echo(Proto::Http1, "a").await;
    let b = Upstream::echo(Proto::Http1, "b").await;
    let proxy = start_proxy(&routing(a.addr, b.addr, "a"));
    assert_eq!(server_of(proxy.outbound).await, "a");
    let (_, ready) = proxy.admin_get("/ready").await;
    assert_eq!(ready, "ready source=file fresh=true version=1\n");

    save(&proxy.policy_path(), &routing(a.addr, b.addr, "b"));
    let took = wait_version(&proxy, 2).await;
    eprintln!("file save -> applied: {took:?}");
    assert_eq!(server_of(proxy.outbound).await, "b");
    assert!(took < Duration::from_secs(2), "{took:?}");
    let config = config(&proxy).await;
    assert_eq!(config["source"], "file");
    assert_eq!(config["fresh"], true);
    assert_eq!(
        config["content_hash"],
        outrider_config::content_hash(&routing(a.addr, b.addr, "b"))
    );
    assert_eq!(
        proxy
            .metric("outrider_policy_reloads_total{result=\"ok\"}")
            .await,
        2.0 // the initial load and the save
    );
    assert_eq!(proxy.metric("outrider_policy_version").await, 2.0);

    // A save with the same content is not a reload.
    save(&proxy.policy_path(), &routing(a.addr, b.addr, "b"));
    save(&proxy.policy_path(), &routing(a.addr, b.addr, "a"));
    wait_version(&proxy, 3).await;
    assert_eq!(server_of(proxy.outbound).await, "a");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_invalid_save_keeps_the_policy_in_force() {
    let a = Upstream::echo(Proto::Http1, "a").await;
    let b = Upstream::echo(Proto::Http1, "b").await;
    let proxy = start_proxy(&routing(a.addr, b.addr, "a"));
    let path = proxy.policy_path();

    // A validation error on line 6, column 14: a route to a service that does not exist.
    save(&path, &routing(a.addr, b.addr, "nope"));
    assert!(
        eventually(Duration::from_secs(5), || proxy
            .logs()
            .iter()
            .any(|l| l.contains("invalid policy file")))
        .await,
        "{}",
        proxy.logs().join("\n")
    );
    let logs = proxy.logs().join("\n");
    let expected = format!(
        "routes[0].service: unknown service `nope` at {}:6:14",
        path.display()
    );
    assert!(logs.contains(&expected), "{logs}");
    assert_eq!(
        proxy
            .metric("outrider_policy_reloads_total{result=\"error\"}")
            .await,
        1.0
    );
    assert_eq!(server_of(proxy.outbound).await, "a");
    assert_eq!(config(&proxy).await["version"], 1);

    // The file is read once per save: the proxy's own read of it, or another file written
    // next to it, is not a change (a re-read here would count and log the error again). No
    // event follows that could show a read did not happen, so this watches a stated window: a
    // read comes 50 ms (the watcher's debounce) after the last event it reacts to; ten times
    // that. Which events count is unit-tested in `watch_file`.
    const NO_READ_WINDOW: Duration = Duration::from_millis(500);
    std::fs::write(path.with_file_name("neighbour.log"), "a log line\n").unwrap();
    tokio::time::sleep(NO_READ_WINDOW).await;
    assert_eq!(
        proxy
            .metric("outrider_policy_reloads_total{result=\"error\"}")
            .await,
        1.0,
        "{}",
        proxy.logs().join("\n")
    );

    // A syntax error the same.
    save(&path, "services: [unclosed\n");
    assert!(
        eventually(Duration::from_secs(5), || proxy
            .logs()
            .iter()
            .filter(|l| l.contains("invalid policy file"))
            .count()
            == 2)
        .await
    );
    assert_eq!(server_of(proxy.outbound).await, "a");

    // Fixing the file applies it.
    save(&path, &routing(a.addr, b.addr, "b"));
    wait_version(&proxy, 2).await;
    assert_eq!(server_of(proxy.outbound).await, "b");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_configmap_symlink_swap_is_a_reload() {
    let a = Upstream::echo(Proto::Http1, "a").await;
    let b = Upstream::echo(Proto::Http1, "b").await;
    // The layout kubelet gives a ConfigMap volume: the file is a symlink through `..data`,
    // and an update swaps `..data` to a new timestamped directory in one rename.
    let dir = TempDir::new();
    let v1 = dir.path.join("..2026_01");
    std::fs::create_dir(&v1).unwrap();
    std::fs::write(v1.join("policy.yaml"), routing(a.addr, b.addr, "a")).unwrap();
    std::os::unix::fs::symlink("..2026_01", dir.path.join("..data")).unwrap();
    std::os::unix::fs::symlink("..data/policy.yaml", dir.path.join("policy.yaml")).unwrap();
    let path = dir.path.join("policy.yaml");
    let proxy = spawn_proxy(TempDir::new(), &["--policy".into(), path.into()]);
    assert_eq!(server_of(proxy.outbound).await, "a");

    let v2 = dir.path.join("..2026_02");
    std::fs::create_dir(&v2).unwrap();
    std::fs::write(v2.join("policy.yaml"), routing(a.addr, b.addr, "b")).unwrap();
    std::os::unix::fs::symlink("..2026_02", dir.path.join("..data_tmp")).unwrap();
    std::fs::rename(dir.path.join("..data_tmp"), dir.path.join("..data")).unwrap();
    std::fs::remove_dir_all(&v1).unwrap();

    wait_version(&proxy, 2).await;
    assert_eq!(server_of(proxy.outbound).await, "b");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dedicated_ports_come_and_go_and_a_taken_port_changes_nothing() {
    let a = Upstream::echo(Proto::Http1, "a").await;
    let b = Upstream::echo(Proto::Http1, "b").await;
    let proxy = start_proxy(&routing(a.addr, b.addr, "a"));
    let path = proxy.policy_path();
    let port = free_port();

    // Added: b gets a dedicated port.
    let with_port = routing(a.addr, b.addr, "a").replace(
        &format!("b: {{ endpoints: [{}] }}", b.addr),
        &format!("b: {{ endpoints: [{}], listen: {port} }}", b.addr),
    );
    save(&path, &with_port);
    wait_version(&proxy, 2).await;
    assert_eq!(config(&proxy).await["listeners"]["b"], port.to_string());
    assert_eq!(server_of(port).await, "b");

    // A port someone else holds: the reload fails whole; the old policy and ports stay.
    let holder = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let taken = holder.local_addr().unwrap();
    let clash = with_port.replace(
        &format!("a: {{ endpoints: [{}] }}", a.addr),
        &format!("a: {{ endpoints: [{}], listen: {taken} }}", a.addr),
    );
    let clash = clash.replace("service: a", "service: b");
    save(&path, &clash);
    assert!(
        eventually(Duration::from_secs(5), || proxy
            .logs()
            .iter()
            .any(|l| l.contains("policy file not applied")))
        .await
    );
    let logs = proxy.logs().join("\n");
    assert!(
        logs.contains(&format!("cannot listen on {taken} for service `a`")),
        "{logs}"
    );
    assert_eq!(config(&proxy).await["version"], 2);
    assert_eq!(server_of(proxy.outbound).await, "a");
    assert_eq!(server_of(port).await, "b");
    drop(holder);

    // Removed: a request in flight on the port finishes, then the port is closed.
    let slow = Upstream::start(Proto::Http1, |_req| async {
        tokio::time::sleep(Duration::from_millis(500)).await;
        Response::new(full("slow"))
    })
    .await;
    let slow_port = free_port();
    let slow_policy = format!(
        "services:\n  slow: {{ endpoints: [{}], listen: {slow_port} }}\n",
        slow.addr
    );
    save(&path, &slow_policy);
    wait_version(&proxy, 3).await;
    let in_flight = tokio::spawn(async move { get(slow_port, "slow", "/").await });
    assert!(eventually(Duration::from_secs(5), || slow.hits() == 1).await);
    save(&path, &routing(a.addr, b.addr, "a"));
    wait_version(&proxy, 4).await;
    let reply = in_flight.await.unwrap();
    assert_eq!(reply.status, 200);
    assert_eq!(&reply.body[..], b"slow");
    assert_eq!(config(&proxy).await["listeners"], serde_json::json!({}));
    assert!(
        tokio::net::TcpStream::connect(slow_port).await.is_err(),
        "removed port still accepts"
    );
    assert!(tokio::net::TcpStream::connect(port).await.is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_in_flight_finishes_under_the_policy_it_started_with() {
    let a = Upstream::start(Proto::Http1, |_req| async {
        tokio::time::sleep(Duration::from_millis(400)).await;
        Response::new(full("{\"server\":\"a\"}"))
    })
    .await;
    let b = Upstream::echo(Proto::Http1, "b").await;
    let proxy = start_proxy(&routing(a.addr, b.addr, "a"));
    let outbound = proxy.outbound;
    let in_flight = tokio::spawn(async move { get(outbound, "svc", "/").await });
    assert!(eventually(Duration::from_secs(5), || a.hits() == 1).await);
    save(&proxy.policy_path(), &routing(a.addr, b.addr, "b"));
    wait_version(&proxy, 2).await;
    assert_eq!(server_of(proxy.outbound).await, "b");
    let reply = in_flight.await.unwrap();
    assert_eq!(reply.status, 200);
    assert_eq!(reply.json()["server"], "a");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hundred_reloads_under_load_lose_no_request() {
    const RELOADS: u64 = 100;
    const CLIENTS: usize = 4;
    let a = Upstream::echo(Proto::Http1, "a").await;
    let b = Upstream::echo(Proto::Http1, "b").await;
    let proxy = start_proxy(&routing(a.addr, b.addr, "a"));
    let path = proxy.policy_path();
    let outbound = proxy.outbound;
    let stop = Arc::new(AtomicBool::new(false));
    let ok = Arc::new(AtomicUsize::new(0));
    let mut clients = Vec::new();
    for i in 0..CLIENTS {
        let (stop, ok) = (Arc::clone(&stop), Arc::clone(&ok));
        clients.push(tokio::spawn(async move {
            // Half keep connections alive across reloads, half open one per request.
            let pooled = http1_client();
            let mut failures = Vec::new();
            let mut sent = 0usize;
            while !stop.load(Ordering::Relaxed) && sent < 50_000 {
                sent += 1;
                let client = if i % 2 == 0 {
                    pooled.clone()
                } else {
                    http1_client()
                };
                let req = Request::get(format!("http://{outbound}/"))
                    .header("host", "svc")
                    .body(empty())
                    .unwrap();
                match client.request(req).await {
                    Ok(res) if res.status() == 200 => {
                        use http_body_util::BodyExt;
                        match res.into_body().collect().await {
                            Ok(_) => {
                                ok.fetch_add(1, Ordering::Relaxed);
                            }
                            Err(e) => failures.push(format!("body: {e}")),
                        }
                    }
                    Ok(res) => failures.push(format!("status {}", res.status())),
                    Err(e) => failures.push(format!("request: {e:?}")),
                }
            }
            failures
        }));
    }
    let started = Instant::now();
    let mut slowest = Duration::ZERO;
    for version in 2..=RELOADS + 1 {
        let target = if version % 2 == 0 { "b" } else { "a" };
        save(&path, &routing(a.addr, b.addr, target));
        slowest = slowest.max(wait_version(&proxy, version).await);
    }
    let reload_time = started.elapsed();
    stop.store(true, Ordering::Relaxed);
    let mut failures = Vec::new();
    for client in clients {
        failures.extend(
            tokio::time::timeout(Duration::from_secs(30), client)
                .await
                .unwrap()
                .unwrap(),
        );
    }
    let served = ok.load(Ordering::Relaxed);
    eprintln!(
        "{RELOADS} reloads in {reload_time:?} (slowest {slowest:?}); {served} requests ok, {} failed; hits a={} b={}",
        failures.len(),
        a.hits(),
        b.hits()
    );
    assert!(
        failures.is_empty(),
        "{} failed: {:?}",
        failures.len(),
        &failures[..failures.len().min(10)]
    );
    assert!(served > 500, "too little load to mean anything: {served}");
    assert!(a.hits() > 0 && b.hits() > 0);
    assert_eq!(
        proxy
            .metric("outrider_policy_reloads_total{result=\"ok\"}")
            .await,
        (RELOADS + 1) as f64
    );
    assert_eq!(
        proxy
            .metric("outrider_policy_reloads_total{result=\"error\"}")
            .await,
        0.0
    );
}

/// Saves `text` the way `cat > file` and editors that write in place do: truncate, a pause,
/// then the new content. In between the file is empty.
fn save_in_place(path: &Path, text: &str) {
    use std::io::Write;
    let mut file = std::fs::File::create(path).unwrap();
    std::thread::sleep(Duration::from_millis(100));
    file.write_all(text.as_bytes()).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn saves_that_truncate_then_write_lose_no_request() {
    const SAVES: u64 = 10;
    const CLIENTS: usize = 2;
    let a = Upstream::echo(Proto::Http1, "a").await;
    let b = Upstream::echo(Proto::Http1, "b").await;
    let proxy = start_proxy(&routing(a.addr, b.addr, "a"));
    let path = proxy.policy_path();
    let outbound = proxy.outbound;
    let stop = Arc::new(AtomicBool::new(false));
    let ok = Arc::new(AtomicUsize::new(0));
    let mut clients = Vec::new();
    for _ in 0..CLIENTS {
        let (stop, ok) = (Arc::clone(&stop), Arc::clone(&ok));
        clients.push(tokio::spawn(async move {
            let client = http1_client();
            let mut failures = Vec::new();
            let mut sent = 0usize;
            while !stop.load(Ordering::Relaxed) && sent < 50_000 {
                sent += 1;
                let req = Request::get(format!("http://{outbound}/"))
                    .header("host", "svc")
                    .body(empty())
                    .unwrap();
                match client.request(req).await {
                    Ok(res) if res.status() == 200 => {
                        use http_body_util::BodyExt;
                        match res.into_body().collect().await {
                            Ok(_) => {
                                ok.fetch_add(1, Ordering::Relaxed);
                            }
                            Err(e) => failures.push(format!("body: {e}")),
                        }
                    }
                    Ok(res) => failures.push(format!("status {}", res.status())),
                    Err(e) => failures.push(format!("request: {e:?}")),
                }
            }
            failures
        }));
    }
    for version in 2..=SAVES + 1 {
        let target = if version % 2 == 0 { "b" } else { "a" };
        let text = routing(a.addr, b.addr, target);
        let hash = outrider_config::content_hash(&text);
        let owned = path.clone();
        tokio::task::spawn_blocking(move || save_in_place(&owned, &text))
            .await
            .unwrap();
        // By content, not version: the old watcher applied the empty file as a version too.
        let deadline = Instant::now() + Duration::from_secs(10);
        while config(&proxy).await["content_hash"] != hash.as_str() {
            assert!(Instant::now() < deadline, "save {version} never applied");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
    stop.store(true, Ordering::Relaxed);
    let mut failures = Vec::new();
    for client in clients {
        failures.extend(
            tokio::time::timeout(Duration::from_secs(30), client)
                .await
                .unwrap()
                .unwrap(),
        );
    }
    let served = ok.load(Ordering::Relaxed);
    let empty_reads = proxy
        .logs()
        .iter()
        .filter(|l| l.contains("the policy file is empty"))
        .count();
    eprintln!(
        "{SAVES} in-place saves; {served} requests ok, {} failed; empty reads skipped: {empty_reads}",
        failures.len()
    );
    assert!(
        failures.is_empty(),
        "{} failed: {:?}",
        failures.len(),
        &failures[..failures.len().min(10)]
    );
    assert!(served > 200, "too little load to mean anything: {served}");
    assert_eq!(config(&proxy).await["version"], SAVES + 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_policy_file_stalls_no_request() {
    let a = Upstream::echo(Proto::Http1, "a").await;
    let b = Upstream::echo(Proto::Http1, "b").await;
    // One runtime thread (the default): parsing on it would stall every request.
    let proxy = start_proxy(&routing(a.addr, b.addr, "a"));
    // 50,000 levels of nesting: seconds of parsing for the YAML parser this was written
    // against (quadratic in depth), and a budget error for one that refuses such depth.
    let depth = 50_000;
    save(
        &proxy.policy_path(),
        &format!("services: {}{}\n", "[".repeat(depth), "]".repeat(depth)),
    );
    let started = Instant::now();
    let mut slowest = Duration::ZERO;
    let mut served = 0;
    while started.elapsed() < Duration::from_secs(2) {
        let sent = Instant::now();
        let reply = tokio::time::timeout(Duration::from_secs(1), get(proxy.outbound, "svc", "/"))
            .await
            .unwrap_or_else(|_| {
                panic!(
                    "a request stalled while the file was parsed ({} served before)",
                    served
                )
            });
        assert_eq!(reply.status, 200);
        slowest = slowest.max(sent.elapsed());
        served += 1;
    }
    eprintln!("{served} requests while a slow file was parsed; slowest {slowest:?}");
    assert_eq!(config(&proxy).await["version"], 1);
}
