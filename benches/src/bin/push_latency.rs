//! `push_latency`: how long a control-plane push takes to reach 1, 100 and 10,000 subscribers.
//!
//! Starts the real `outrider-control` binary (from the same target directory) on 127.0.0.1,
//! opens N subscriptions with lightweight clients (one TCP connection each, HTTP/1.1 or h2c;
//! not proxy processes), waits for every initial policy, then applies a changed document
//! through `POST /v1/apply` P times and records, for each subscriber, the time from sending
//! the apply to receiving the update line. Everything is bounded: connect, initial sync and
//! each push have deadlines, and a missing update is reported, not waited for.
//!
//! With `--replicas 3` it starts a 3-member etcd cluster itself (the `etcd` binary on PATH,
//! members on free loopback ports, data in a temporary directory, all killed and removed at
//! the end) and 3 replicas on it (`--store etcd://...`); subscribers are spread over the
//! replicas round-robin, and pushes are applied on each replica in turn, so most updates cross
//! etcd's watch. After the last size it kills (SIGKILL) one replica, applies a change on
//! another, and measures how long until every subscriber holds it: the killed replica's
//! subscribers reconnect to the next replica (after up to 100 ms, as a proxy's first backoff
//! does) and get it there.
//!
//! ```sh
//! cargo build --release -p outrider-control -p outrider-benches --bins
//! target/release/push_latency [--sizes 1,100,10000] [--pushes 5] [--h2] [--replicas 3]
//! ```

#![allow(clippy::unwrap_used)]

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use http::Request;
use http_body_util::{BodyExt, Empty, Full};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::sync::{mpsc, Semaphore};

const TOKEN: &str = "push-latency-bench";
/// Connections opened at once while building up the subscriber set.
const CONNECT_CONCURRENCY: usize = 256;
/// Bound on opening every subscription and receiving its initial policy.
const SYNC_DEADLINE: Duration = Duration::from_secs(120);
/// Bound on one push reaching every subscriber.
const PUSH_DEADLINE: Duration = Duration::from_secs(30);
/// Bound on an etcd member joining its cluster and a replica starting on it.
const START_DEADLINE: Duration = Duration::from_secs(30);
/// Bound on a subscriber's TCP connect (a proxy's, too).
const CONNECT_DEADLINE: Duration = Duration::from_secs(2);
/// Bound on the fleet holding a change after a replica is killed.
const CONVERGE_DEADLINE: Duration = Duration::from_secs(60);

struct Args {
    sizes: Vec<usize>,
    pushes: usize,
    h2: bool,
    /// 1: one replica on the file store; more: that many on a 3-member etcd cluster.
    replicas: usize,
}

fn parse_args() -> Args {
    let mut args = Args {
        sizes: vec![1, 100, 10_000],
        pushes: 5,
        h2: false,
        replicas: 1,
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        match arg.as_str() {
            "--sizes" => {
                args.sizes = it
                    .next()
                    .expect("--sizes N,N")
                    .split(',')
                    .map(|n| n.parse().expect("a number"))
                    .collect();
            }
            "--pushes" => args.pushes = it.next().expect("--pushes N").parse().expect("a number"),
            "--h2" => args.h2 = true,
            "--replicas" => {
                args.replicas = it.next().expect("--replicas N").parse().expect("a number");
                assert!(args.replicas >= 1, "--replicas is at least 1");
            }
            other => {
                eprintln!(
                    "usage: push_latency [--sizes 1,100,10000] [--pushes 5] [--h2] [--replicas N] (got {other})"
                );
                std::process::exit(64);
            }
        }
    }
    args
}

fn main() {
    let args = parse_args();
    // 10,000 subscriptions need 10,000 descriptors here (and as many in the server).
    match rlimit::increase_nofile_limit(u64::MAX) {
        Ok(limit) => eprintln!("RLIMIT_NOFILE raised to {limit}"),
        Err(e) => eprintln!("cannot raise RLIMIT_NOFILE: {e}"),
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(run(args));
}

struct Server {
    child: Child,
    addr: SocketAddr,
    _dir: PathBuf,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self._dir);
    }
}

/// Starts replica `index` of `outrider-control`: on the file store in its own directory, or
/// on `etcd` (an `etcd://` URL) when given.
fn start_server(index: usize, etcd: Option<&str>) -> Server {
    let bin = std::env::current_exe()
        .unwrap()
        .parent()
        .unwrap()
        .join("outrider-control");
    assert!(
        bin.exists(),
        "{} missing: build it first (cargo build -p outrider-control --bins)",
        bin.display()
    );
    let dir = std::env::temp_dir().join(format!(
        "outrider-push-latency-{}-{index}",
        std::process::id()
    ));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(dir.join("policies")).unwrap();
    std::fs::write(dir.join("token"), TOKEN).unwrap();
    let mut command = Command::new(&bin);
    command
        .arg("serve")
        .arg("--policies")
        .arg(dir.join("policies"));
    match etcd {
        Some(url) => command.args(["--store", url, "--replica-name", &format!("bench-{index}")]),
        None => command.arg("--state").arg(dir.join("state")),
    };
    let mut child = command
        .arg("--token-file")
        .arg(dir.join("token"))
        .args([
            "--listen",
            "127.0.0.1:0",
            "--log",
            "warn,outrider_control=info",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let mut lines = BufReader::new(stderr).lines();
    // Bounded by the server: it logs `listening` or exits (its etcd deadline) before then.
    let addr = loop {
        let line = lines.next().expect("server exited").unwrap();
        if line.contains("\"message\":\"listening\"") {
            let value: serde_json::Value = serde_json::from_str(&line).unwrap();
            break value["listen"].as_str().unwrap().parse().unwrap();
        }
    };
    // Keep draining its log so it never blocks on a full pipe.
    std::thread::spawn(move || for _ in lines {});
    Server {
        child,
        addr,
        _dir: dir,
    }
}

fn document(workload: &str, port: u32) -> String {
    format!(
        "workload: {workload}\nservices:\n  backend: {{ endpoints: [127.0.0.1:{port}] }}\nroutes:\n  - {{ match: {{ authority: backend }}, service: backend }}\n"
    )
}

/// Applies workload `workload`'s document with `port` on the replica at `addr`: how long the
/// answer took, and the version it made.
async fn apply(addr: SocketAddr, workload: &str, port: u32) -> (Duration, u64) {
    let started = Instant::now();
    let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(conn);
    let req = Request::post(format!("http://{addr}/v1/apply?name={workload}"))
        .header("authorization", format!("Bearer {TOKEN}"))
        .header("host", addr.to_string())
        .body(Full::new(Bytes::from(document(workload, port))))
        .unwrap();
    let res = sender.send_request(req).await.unwrap();
    let status = res.status();
    let body = res.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    let answer: serde_json::Value = serde_json::from_slice(&body).unwrap();
    (started.elapsed(), answer["version"].as_u64().unwrap())
}

/// An update a subscriber received: its id, the version, and when.
type Received = (usize, u64, Instant);

/// One subscriber: reports every update line it receives. Subscribes to `replicas[first]`;
/// when that fails or its stream ends, to the next replica, after a delay spread over 0 to
/// 100 ms by `id` (as a proxy's first backoff, full jitter from 100 ms).
async fn subscribe(
    replicas: Arc<Vec<SocketAddr>>,
    first: usize,
    workload: String,
    id: usize,
    h2: bool,
    updates: mpsc::UnboundedSender<Received>,
    connect_permits: Arc<Semaphore>,
) {
    let mut permit = Some(connect_permits.acquire_owned().await.unwrap());
    let mut index = first;
    loop {
        let addr = replicas[index % replicas.len()];
        match subscription(addr, &workload, id, h2).await {
            Some(body) => {
                drop(permit.take());
                if read_updates(body, id, &updates).await.is_err() {
                    return;
                }
            }
            None => drop(permit.take()),
        }
        index += 1;
        let spread = (id as u64).wrapping_mul(7919) % 100;
        tokio::time::sleep(Duration::from_millis(spread)).await;
    }
}

/// Opens one subscription: its body, or `None` when the replica cannot be reached or refuses.
async fn subscription(
    addr: SocketAddr,
    workload: &str,
    id: usize,
    h2: bool,
) -> Option<hyper::body::Incoming> {
    let stream = tokio::time::timeout(CONNECT_DEADLINE, tokio::net::TcpStream::connect(addr))
        .await
        .ok()?
        .ok()?;
    stream.set_nodelay(true).ok()?;
    let req = Request::get(format!(
        "http://{addr}/v1/subscribe?workload={workload}&proxy=bench-{id}"
    ))
    .header("authorization", format!("Bearer {TOKEN}"))
    .header("host", addr.to_string())
    .body(Empty::<Bytes>::new())
    .unwrap();
    let res = if h2 {
        let (mut sender, conn) =
            hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
                .await
                .ok()?;
        tokio::spawn(conn);
        sender.send_request(req).await.ok()?
    } else {
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .ok()?;
        tokio::spawn(conn);
        sender.send_request(req).await.ok()?
    };
    (res.status() == 200).then(|| res.into_body())
}

/// Reports each update line of `body` until it ends; `Err` when nobody listens any more.
async fn read_updates(
    mut body: hyper::body::Incoming,
    id: usize,
    updates: &mpsc::UnboundedSender<Received>,
) -> Result<(), ()> {
    let mut buf = BytesMut::new();
    while let Some(Ok(frame)) = body.frame().await {
        let at = Instant::now();
        let Ok(data) = frame.into_data() else {
            continue;
        };
        buf.extend_from_slice(&data);
        while let Some(end) = buf.iter().position(|b| *b == b'\n') {
            let line = buf.split_to(end + 1);
            if let Some(version) = update_version(&line) {
                updates.send((id, version, at)).map_err(drop)?;
            }
        }
    }
    Ok(())
}

/// The version of an update line, read without decoding the policy it carries.
fn update_version(line: &[u8]) -> Option<u64> {
    let rest = line.strip_prefix(b"{\"type\":\"update\",\"version\":")?;
    let digits = rest.iter().take_while(|b| b.is_ascii_digit()).count();
    std::str::from_utf8(&rest[..digits]).ok()?.parse().ok()
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

fn ms(d: Duration) -> String {
    format!("{:.1}", d.as_secs_f64() * 1000.0)
}

async fn run(args: Args) {
    let etcd = (args.replicas > 1).then(Etcd::start);
    let mut servers: Vec<Option<Server>> = (0..args.replicas)
        .map(|i| Some(start_server(i, etcd.as_ref().map(|e| e.url.as_str()))))
        .collect();
    let replicas: Arc<Vec<SocketAddr>> = Arc::new(
        servers
            .iter()
            .map(|s| s.as_ref().map(|s| s.addr).unwrap())
            .collect(),
    );
    match &etcd {
        Some(_) => println!(
            "{} replicas on a 3-member etcd cluster; subscribers spread over them, pushes applied on each in turn",
            args.replicas
        ),
        None => println!("one replica on the file store"),
    }
    println!(
        "| subscribers | pushes | received | p50 ms | p99 ms | max ms | apply round trip p50 ms | sync of all initial policies s |"
    );
    println!("|---:|---:|---:|---:|---:|---:|---:|---:|");
    for (round, &n) in args.sizes.iter().enumerate() {
        let workload = format!("bench-{round}-{n}");
        apply(replicas[0], &workload, 1).await;
        let (tx, mut rx) = mpsc::unbounded_channel();
        let permits = Arc::new(Semaphore::new(CONNECT_CONCURRENCY));
        let sync_start = Instant::now();
        let tasks: Vec<_> = (0..n)
            .map(|i| {
                tokio::spawn(subscribe(
                    Arc::clone(&replicas),
                    i,
                    workload.clone(),
                    i,
                    args.h2,
                    tx.clone(),
                    Arc::clone(&permits),
                ))
            })
            .collect();
        drop(tx);
        let mut initial = 0;
        let sync_deadline = tokio::time::Instant::now() + SYNC_DEADLINE;
        while initial < n {
            match tokio::time::timeout_at(sync_deadline, rx.recv()).await {
                Ok(Some(_)) => initial += 1,
                _ => panic!("only {initial} of {n} subscribers synced within {SYNC_DEADLINE:?}"),
            }
        }
        let sync = sync_start.elapsed();
        let mut latencies = Vec::with_capacity(n * args.pushes);
        let mut applies = Vec::new();
        let mut missing = 0;
        for push in 0..args.pushes {
            let port = 2 + push as u32;
            let sent = Instant::now();
            let (took, version) = apply(replicas[push % replicas.len()], &workload, port).await;
            applies.push(took);
            let mut got = 0;
            let deadline = tokio::time::Instant::now() + PUSH_DEADLINE;
            while got < n {
                match tokio::time::timeout_at(deadline, rx.recv()).await {
                    Ok(Some((_, received, at))) if received == version => {
                        latencies.push(at.saturating_duration_since(sent));
                        got += 1;
                    }
                    Ok(Some(_)) => {}
                    _ => break,
                }
            }
            missing += n - got;
            // Let the machine settle between pushes.
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        latencies.sort();
        applies.sort();
        println!(
            "| {n} | {} | {} | {} | {} | {} | {} | {:.2} |",
            args.pushes,
            latencies.len(),
            ms(percentile(&latencies, 50.0)),
            ms(percentile(&latencies, 99.0)),
            ms(latencies.last().copied().unwrap_or_default()),
            ms(percentile(&applies, 50.0)),
            sync.as_secs_f64(),
        );
        if missing > 0 {
            println!("  ({missing} updates not received within {PUSH_DEADLINE:?})");
        }
        if replicas.len() > 1 && round + 1 == args.sizes.len() {
            converge_after_kill(&mut servers, &replicas, &workload, n, &mut rx).await;
        }
        for task in tasks {
            task.abort();
        }
        // Closed connections leave the server's books before the next round.
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// Kills the last replica, applies a change on the first, and reports how long until each of
/// the `n` subscribers holds it (the killed replica's after reconnecting to the next).
async fn converge_after_kill(
    servers: &mut [Option<Server>],
    replicas: &[SocketAddr],
    workload: &str,
    n: usize,
    rx: &mut mpsc::UnboundedReceiver<Received>,
) {
    let victim = replicas.len() - 1;
    let killed_at = Instant::now();
    drop(servers[victim].take());
    let (_, version) = apply(replicas[0], workload, 9_999).await;
    let mut holds = vec![false; n];
    let (mut held, mut orphans_last) = (0, Duration::ZERO);
    let mut others_last = Duration::ZERO;
    let deadline = tokio::time::Instant::now() + CONVERGE_DEADLINE;
    while held < n {
        match tokio::time::timeout_at(deadline, rx.recv()).await {
            Ok(Some((id, received, at))) if received >= version && !holds[id] => {
                holds[id] = true;
                held += 1;
                let after = at.saturating_duration_since(killed_at);
                if id % replicas.len() == victim {
                    orphans_last = orphans_last.max(after);
                } else {
                    others_last = others_last.max(after);
                }
            }
            Ok(Some(_)) => {}
            _ => break,
        }
    }
    let orphans = (0..n).filter(|id| id % replicas.len() == victim).count();
    println!();
    println!(
        "replica {victim} killed (SIGKILL) with {orphans} of {n} subscribers, a change applied on replica 0 right after:"
    );
    println!(
        "every subscriber holds it {:.2} s after the kill (those of the surviving replicas: {:.2} s; the killed one's, reconnected: {:.2} s){}",
        orphans_last.max(others_last).as_secs_f64(),
        others_last.as_secs_f64(),
        orphans_last.as_secs_f64(),
        if held < n {
            format!("; {} did not within {CONVERGE_DEADLINE:?}", n - held)
        } else {
            String::new()
        }
    );
}

/// A 3-member etcd cluster on free loopback ports, data in a temporary directory; killed and
/// removed on drop.
struct Etcd {
    members: Vec<Child>,
    url: String,
    dir: PathBuf,
}

impl Etcd {
    fn start() -> Self {
        let dir =
            std::env::temp_dir().join(format!("outrider-push-latency-etcd-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        // Held together while chosen, so they differ.
        let listeners: Vec<std::net::TcpListener> = (0..6)
            .map(|_| std::net::TcpListener::bind("127.0.0.1:0").unwrap())
            .collect();
        let ports: Vec<u16> = listeners
            .iter()
            .map(|l| l.local_addr().unwrap().port())
            .collect();
        drop(listeners);
        let initial_cluster = (0..3)
            .map(|i| format!("m{i}=http://127.0.0.1:{}", ports[i * 2 + 1]))
            .collect::<Vec<_>>()
            .join(",");
        let mut etcd = Self {
            members: Vec::new(),
            url: format!(
                "etcd://127.0.0.1:{},127.0.0.1:{},127.0.0.1:{}",
                ports[0], ports[2], ports[4]
            ),
            dir,
        };
        for i in 0..3 {
            let (client, peer) = (
                format!("http://127.0.0.1:{}", ports[i * 2]),
                format!("http://127.0.0.1:{}", ports[i * 2 + 1]),
            );
            let log = std::fs::File::create(etcd.dir.join(format!("m{i}.log"))).unwrap();
            let child = Command::new("etcd")
                .args(["--name", &format!("m{i}")])
                .arg("--data-dir")
                .arg(etcd.dir.join(format!("m{i}")))
                .args(["--listen-client-urls", &client])
                .args(["--advertise-client-urls", &client])
                .args(["--listen-peer-urls", &peer])
                .args(["--initial-advertise-peer-urls", &peer])
                .args(["--initial-cluster", &initial_cluster])
                .args(["--initial-cluster-state", "new"])
                .args(["--initial-cluster-token", "outrider-push-latency"])
                .args(["--logger", "zap", "--log-level", "warn"])
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(log)
                .spawn()
                .expect("etcd on PATH (scripts/ensure-etcd installs it)");
            etcd.members.push(child);
        }
        let deadline = Instant::now() + START_DEADLINE;
        for i in 0..3 {
            while !healthy(ports[i * 2]) {
                assert!(
                    Instant::now() < deadline,
                    "etcd member {i} not healthy within {START_DEADLINE:?} (logs in {})",
                    etcd.dir.display()
                );
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        etcd
    }
}

/// Whether the etcd member with client port `port` answers `/health` with a leader.
fn healthy(port: u16) -> bool {
    use std::io::{Read, Write};
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let Ok(mut stream) = std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(500))
    else {
        return false;
    };
    let _ = stream.set_read_timeout(Some(Duration::from_secs(2)));
    let _ = stream.set_write_timeout(Some(Duration::from_secs(2)));
    if stream
        .write_all(format!("GET /health HTTP/1.0\r\nHost: {addr}\r\n\r\n").as_bytes())
        .is_err()
    {
        return false;
    }
    let mut answer = String::new();
    let _ = stream.take(64 * 1024).read_to_string(&mut answer);
    answer.contains("\"health\":\"true\"")
}

impl Drop for Etcd {
    fn drop(&mut self) {
        for member in &mut self.members {
            let _ = member.kill();
            let _ = member.wait();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
