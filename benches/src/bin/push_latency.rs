//! `push_latency`: how long a control-plane push takes to reach 1, 100 and 10,000 subscribers.
//!
//! Starts the real `outrider-control` binary (from the same target directory) on 127.0.0.1,
//! opens N subscriptions with lightweight clients (one TCP connection each, HTTP/1.1 or h2c;
//! not proxy processes), waits for every initial policy, then applies a changed document
//! through `POST /v1/apply` P times and records, for each subscriber, the time from sending
//! the apply to receiving the update line. Everything is bounded: connect, initial sync and
//! each push have deadlines, and a missing update is reported, not waited for.
//!
//! ```sh
//! cargo build --release -p outrider-control -p outrider-benches --bins
//! target/release/push_latency [--sizes 1,100,10000] [--pushes 5] [--h2]
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

struct Args {
    sizes: Vec<usize>,
    pushes: usize,
    h2: bool,
}

fn parse_args() -> Args {
    let mut args = Args {
        sizes: vec![1, 100, 10_000],
        pushes: 5,
        h2: false,
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
            other => {
                eprintln!(
                    "usage: push_latency [--sizes 1,100,10000] [--pushes 5] [--h2] (got {other})"
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

fn start_server() -> Server {
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
    let dir = std::env::temp_dir().join(format!("outrider-push-latency-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(dir.join("policies")).unwrap();
    std::fs::write(dir.join("token"), TOKEN).unwrap();
    let mut child = Command::new(&bin)
        .arg("serve")
        .arg("--policies")
        .arg(dir.join("policies"))
        .arg("--state")
        .arg(dir.join("state"))
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

async fn apply(addr: SocketAddr, workload: &str, port: u32) -> Duration {
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
    started.elapsed()
}

/// One subscriber: reports (version, when received) for every update line.
async fn subscribe(
    addr: SocketAddr,
    workload: String,
    id: usize,
    h2: bool,
    updates: mpsc::UnboundedSender<(u64, Instant)>,
    connect_permits: Arc<Semaphore>,
) {
    let permit = connect_permits.acquire_owned().await.unwrap();
    let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    stream.set_nodelay(true).unwrap();
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
                .unwrap();
        tokio::spawn(conn);
        sender.send_request(req).await.unwrap()
    } else {
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .unwrap();
        tokio::spawn(conn);
        sender.send_request(req).await.unwrap()
    };
    drop(permit);
    assert_eq!(res.status(), 200);
    let mut body = res.into_body();
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
                if updates.send((version, at)).is_err() {
                    return;
                }
            }
        }
    }
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
    let server = start_server();
    println!(
        "| subscribers | pushes | received | p50 ms | p99 ms | max ms | apply round trip p50 ms | sync of all initial policies s |"
    );
    println!("|---:|---:|---:|---:|---:|---:|---:|---:|");
    for (round, &n) in args.sizes.iter().enumerate() {
        let workload = format!("bench-{round}-{n}");
        apply(server.addr, &workload, 1).await;
        let (tx, mut rx) = mpsc::unbounded_channel();
        let permits = Arc::new(Semaphore::new(CONNECT_CONCURRENCY));
        let sync_start = Instant::now();
        let tasks: Vec<_> = (0..n)
            .map(|i| {
                tokio::spawn(subscribe(
                    server.addr,
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
            applies.push(apply(server.addr, &workload, port).await);
            let mut got = 0;
            let deadline = tokio::time::Instant::now() + PUSH_DEADLINE;
            while got < n {
                match tokio::time::timeout_at(deadline, rx.recv()).await {
                    Ok(Some((_, at))) => {
                        latencies.push(at.saturating_duration_since(sent));
                        got += 1;
                    }
                    _ => break,
                }
            }
            missing += n - got;
            // Let the machine settle between pushes.
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        for task in tasks {
            task.abort();
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
        // Closed connections leave the server's books before the next round.
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}
