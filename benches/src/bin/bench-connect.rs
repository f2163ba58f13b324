//! `bench-connect`: new connections per second against a proxy's inbound port, the part of
//! mesh mTLS that costs (`benches/load.sh --mtls`). Each of N workers, for a fixed duration,
//! opens a TCP connection, with `--mtls` runs the TLS 1.3 handshake a sidecar runs (client
//! certificate, peer verified by SPIFFE id, no session resumption), sends one HTTP/1.1
//! `GET /` with `Connection: close`, reads the whole response and drops the connection.
//!
//! With `--mtls` the client gets its workload certificate exactly as `outrider-proxy` does: it
//! runs the proxy's own identity code (`outrider_proxy::control::certificate`), which makes a
//! key in memory, posts a CSR with the token to the control plane and installs the answer, and
//! it connects with the proxy's own mesh client config.
//!
//! Output: one line on stdout,
//! `CONNECT ok=N errors=N connect=N handshake=N request=N status=N timeout=N duration_us=N
//! cpu_ticks=N tls=... suite=... group=... alpn=... peer=...` (`cpu_ticks`: this process's CPU
//! over the run, in /proc clock ticks; the last five from the first handshake, `-` in
//! plaintext); the first few distinct errors on stderr. Exit 0 even with errors (the caller
//! decides); 64 on bad usage, 69 when no certificate arrives.
//!
//! ```sh
//! bench-connect --target 127.0.0.1:18086 --duration 5 --concurrency 32 [--host bench]
//!   [--mtls --control http://127.0.0.1:18088 --token-file F --namespace NS
//!    --service-account SA --expect spiffe://cluster.local/ns/NS/sa/SERVER]
//! ```

use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{header, Request, StatusCode};
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;
use outrider_proxy::control::certificate::{self, IdentityConfig};
use outrider_proxy::control::client::Token;
use outrider_proxy::control::replicas::Replicas;
use outrider_proxy::control::subscribe::ControlConfig;
use outrider_proxy::io::identity::{self, Mesh, ALPN_HTTP1};
use outrider_proxy::telemetry::metrics::Metrics;
use rustls::pki_types::ServerName;
use rustls::ClientConfig;
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

const USAGE: &str = "usage: bench-connect --target ADDR [--duration SECS] [--concurrency N] \
[--host HOST] [--mtls --control URL --token-file FILE --namespace NS --service-account SA \
--expect SPIFFE_ID]";
/// Bound on one connection: connect, handshake, request and response.
const CONNECTION_TIMEOUT: Duration = Duration::from_secs(10);
/// Bound on getting the workload certificate from the control plane.
const CERTIFICATE_TIMEOUT: Duration = Duration::from_secs(15);
/// utime + stime of this process in clock ticks (fields 14 and 15 of /proc/self/stat), so the
/// caller can tell whether the generator's CPU was the limit; 0 where /proc is missing.
fn cpu_ticks() -> u64 {
    let Ok(stat) = std::fs::read_to_string("/proc/self/stat") else {
        return 0;
    };
    // The command name may hold spaces; the fields after it are space-separated.
    let Some((_, rest)) = stat.rsplit_once(") ") else {
        return 0;
    };
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let field = |i: usize| {
        fields
            .get(i)
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0)
    };
    field(11) + field(12)
}

/// Distinct error messages printed at the end.
const ERRORS_SHOWN: usize = 5;

/// The mTLS side of the command line.
struct MtlsArgs {
    control: String,
    token_file: String,
    namespace: String,
    service_account: String,
    expect: String,
}

/// What the command line asks for.
struct Args {
    target: SocketAddr,
    duration: Duration,
    concurrency: usize,
    host: String,
    mtls: Option<MtlsArgs>,
}

fn parse_args() -> Result<Args, String> {
    let mut target = None;
    let mut duration = Duration::from_secs(5);
    let mut concurrency = 32;
    let mut host = "bench".to_string();
    let mut mtls = false;
    let (mut control, mut token_file, mut namespace, mut service_account, mut expect) =
        (None, None, None, None, None);
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        let mut value = |name: &str| it.next().ok_or_else(|| format!("{name} needs a value"));
        match arg.as_str() {
            "--target" => {
                let v = value("--target")?;
                target = Some(v.parse().map_err(|e| format!("--target {v}: {e}"))?);
            }
            "--duration" => {
                let v = value("--duration")?;
                let secs: u64 = v.parse().map_err(|e| format!("--duration {v}: {e}"))?;
                duration = Duration::from_secs(secs);
            }
            "--concurrency" => {
                let v = value("--concurrency")?;
                concurrency = v.parse().map_err(|e| format!("--concurrency {v}: {e}"))?;
            }
            "--host" => host = value("--host")?,
            "--mtls" => mtls = true,
            "--control" => control = Some(value("--control")?),
            "--token-file" => token_file = Some(value("--token-file")?),
            "--namespace" => namespace = Some(value("--namespace")?),
            "--service-account" => service_account = Some(value("--service-account")?),
            "--expect" => expect = Some(value("--expect")?),
            "-h" | "--help" => return Err("help".into()),
            other => return Err(format!("unknown argument {other:?}")),
        }
    }
    let target = target.ok_or("--target is required")?;
    if duration.is_zero() || concurrency == 0 {
        return Err("--duration and --concurrency must be positive".into());
    }
    let mtls = if mtls {
        let need = |v: Option<String>, name: &str| v.ok_or_else(|| format!("--mtls needs {name}"));
        Some(MtlsArgs {
            control: need(control, "--control")?,
            token_file: need(token_file, "--token-file")?,
            namespace: need(namespace, "--namespace")?,
            service_account: need(service_account, "--service-account")?,
            expect: need(expect, "--expect")?,
        })
    } else {
        None
    };
    Ok(Args {
        target,
        duration,
        concurrency,
        host,
        mtls,
    })
}

/// Counters shared by the workers.
#[derive(Default)]
struct Counts {
    ok: AtomicU64,
    connect: AtomicU64,
    handshake: AtomicU64,
    request: AtomicU64,
    status: AtomicU64,
    timeout: AtomicU64,
    /// What the first mTLS handshake negotiated: TLS version, cipher suite, key exchange
    /// group, ALPN, peer.
    negotiated: Mutex<Option<[String; 5]>>,
    /// The first distinct error messages.
    errors: Mutex<Vec<String>>,
}

impl Counts {
    fn error(&self, counter: &AtomicU64, message: String) {
        counter.fetch_add(1, Ordering::Relaxed);
        if let Ok(mut errors) = self.errors.lock() {
            if errors.len() < ERRORS_SHOWN && !errors.contains(&message) {
                errors.push(message);
            }
        }
    }
}

/// Why one connection failed, and which counter it goes to.
enum Failure {
    Connect(std::io::Error),
    Handshake(String),
    Request(String),
    Status(StatusCode),
}

/// One connection: connect, handshake (mTLS), one request, the whole response.
async fn one(
    target: SocketAddr,
    host: &str,
    tls: Option<&Arc<ClientConfig>>,
    counts: &Counts,
) -> Result<(), Failure> {
    let tcp = TcpStream::connect(target).await.map_err(Failure::Connect)?;
    // As the proxy's connector does: requests are small and latency-bound.
    let _ = tcp.set_nodelay(true);
    let request = Request::get("/")
        .header(header::HOST, host)
        .header(header::CONNECTION, "close")
        .body(Empty::<Bytes>::new())
        .map_err(|e| Failure::Request(e.to_string()))?;
    let response = match tls {
        None => exchange(tcp, request).await?,
        Some(config) => {
            // The peer is checked by SPIFFE id; the name only fills the (unsent) SNI slot.
            let name = ServerName::IpAddress(target.ip().into());
            let stream = TlsConnector::from(Arc::clone(config))
                .connect(name, tcp)
                .await
                .map_err(|e| Failure::Handshake(identity::describe(&e)))?;
            if let Ok(mut negotiated) = counts.negotiated.lock() {
                if negotiated.is_none() {
                    let conn = stream.get_ref().1;
                    let show = |v: Option<String>| v.unwrap_or_else(|| "-".into());
                    *negotiated = Some([
                        show(conn.protocol_version().map(|v| format!("{v:?}"))),
                        show(
                            conn.negotiated_cipher_suite()
                                .map(|s| format!("{:?}", s.suite())),
                        ),
                        show(
                            conn.negotiated_key_exchange_group()
                                .map(|g| format!("{:?}", g.name())),
                        ),
                        show(
                            conn.alpn_protocol()
                                .map(|a| String::from_utf8_lossy(a).into_owned()),
                        ),
                        show(
                            conn.peer_certificates()
                                .and_then(|c| c.first())
                                .and_then(identity::spiffe_id_of),
                        ),
                    ]);
                }
            }
            exchange(stream, request).await?
        }
    };
    if response == StatusCode::OK {
        Ok(())
    } else {
        Err(Failure::Status(response))
    }
}

/// HTTP/1.1 over `io`: sends `request`, reads the response to its end.
async fn exchange<T>(io: T, request: Request<Empty<Bytes>>) -> Result<StatusCode, Failure>
where
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(io))
        .await
        .map_err(|e| Failure::Request(e.to_string()))?;
    // The sender moves in, so it is dropped with the response read and the connection task
    // ends even if the server kept the connection open.
    let request_done = async move {
        let response = sender
            .send_request(request)
            .await
            .map_err(|e| Failure::Request(e.to_string()))?;
        let status = response.status();
        response
            .into_body()
            .collect()
            .await
            .map_err(|e| Failure::Request(format!("response body: {e}")))?;
        Ok::<_, Failure>(status)
    };
    // The connection task runs beside the request; with `Connection: close` it ends once the
    // response is read.
    let (status, conn_result) = tokio::join!(request_done, conn);
    let status = status?;
    conn_result.map_err(|e| Failure::Request(format!("connection: {e}")))?;
    Ok(status)
}

async fn worker(
    target: SocketAddr,
    host: Arc<str>,
    tls: Option<Arc<ClientConfig>>,
    deadline: Instant,
    counts: Arc<Counts>,
) {
    // A connection started before the deadline runs to completion, so none is cut short and
    // miscounted as an error.
    while Instant::now() < deadline {
        match tokio::time::timeout(
            CONNECTION_TIMEOUT,
            one(target, &host, tls.as_ref(), &counts),
        )
        .await
        {
            Ok(Ok(())) => {
                counts.ok.fetch_add(1, Ordering::Relaxed);
            }
            Ok(Err(Failure::Connect(e))) => {
                counts.error(&counts.connect, format!("connect: {e}"));
                // Nothing listens, or the backlog is full: do not spin on it.
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            Ok(Err(Failure::Handshake(e))) => {
                counts.error(&counts.handshake, format!("TLS handshake: {e}"))
            }
            Ok(Err(Failure::Request(e))) => counts.error(&counts.request, format!("request: {e}")),
            Ok(Err(Failure::Status(s))) => counts.error(&counts.status, format!("status {s}")),
            Err(_) => counts.error(
                &counts.timeout,
                format!("no response within {CONNECTION_TIMEOUT:?}"),
            ),
        }
    }
}

/// The proxy's identity machinery, run here: a certificate for `args` from the control plane.
async fn mesh_client_config(args: &MtlsArgs) -> Result<Arc<ClientConfig>, String> {
    let metrics = Metrics::new("bench-connect").map_err(|e| e.to_string())?;
    let mesh = Mesh::new(&metrics).map_err(|e| e.to_string())?;
    certificate::spawn(
        IdentityConfig {
            control: ControlConfig {
                replicas: Arc::new(
                    Replicas::parse(&[args.control.as_str()]).map_err(|e| e.to_string())?,
                ),
                token: Token::File(args.token_file.clone().into()),
                proxy_id: "bench-connect".into(),
                workload: "bench-connect".into(),
                state_dir: None,
                service_account_token: None,
            },
            namespace: args.namespace.clone(),
            service_account: args.service_account.clone(),
        },
        Arc::clone(&mesh),
    );
    let waited = Instant::now();
    while !mesh.ready() {
        if waited.elapsed() > CERTIFICATE_TIMEOUT {
            return Err(format!(
                "no workload certificate from {} within {CERTIFICATE_TIMEOUT:?} (token file {}, namespace {}, service account {})",
                args.control, args.token_file, args.namespace, args.service_account
            ));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Exactly what a proxy builds for a `tls: mesh` service with `protocol: http1` and
    // `identity: EXPECT`.
    mesh.client_config(
        Some(Arc::from(args.expect.as_str())),
        vec![ALPN_HTTP1.to_vec()],
    )
    .map_err(|e| e.to_string())
}

async fn run(args: Args) -> ExitCode {
    let tls = match &args.mtls {
        None => None,
        Some(mtls) => match mesh_client_config(mtls).await {
            Ok(config) => Some(config),
            Err(message) => {
                eprintln!("bench-connect: {message}");
                return ExitCode::from(69);
            }
        },
    };
    let counts = Arc::new(Counts::default());
    let ticks_before = cpu_ticks();
    let host: Arc<str> = Arc::from(args.host.as_str());
    let started = Instant::now();
    let deadline = started + args.duration;
    let workers: Vec<_> = (0..args.concurrency)
        .map(|_| {
            tokio::spawn(worker(
                args.target,
                Arc::clone(&host),
                tls.clone(),
                deadline,
                Arc::clone(&counts),
            ))
        })
        .collect();
    for worker in workers {
        if let Err(e) = worker.await {
            eprintln!("bench-connect: worker failed: {e}");
            return ExitCode::from(70);
        }
    }
    let elapsed = started.elapsed();
    let ticks = cpu_ticks().saturating_sub(ticks_before);
    let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
    let errors = get(&counts.connect)
        + get(&counts.handshake)
        + get(&counts.request)
        + get(&counts.status)
        + get(&counts.timeout);
    let negotiated = counts
        .negotiated
        .lock()
        .ok()
        .and_then(|n| n.clone())
        .unwrap_or_else(|| std::array::from_fn(|_| "-".to_string()));
    println!(
        "CONNECT ok={} errors={errors} connect={} handshake={} request={} status={} timeout={} duration_us={} cpu_ticks={ticks} tls={} suite={} group={} alpn={} peer={}",
        get(&counts.ok),
        get(&counts.connect),
        get(&counts.handshake),
        get(&counts.request),
        get(&counts.status),
        get(&counts.timeout),
        elapsed.as_micros(),
        negotiated[0],
        negotiated[1],
        negotiated[2],
        negotiated[3],
        negotiated[4],
    );
    if let Ok(errors) = counts.errors.lock() {
        for message in errors.iter() {
            eprintln!("bench-connect: {message}");
        }
    }
    ExitCode::SUCCESS
}

fn main() -> ExitCode {
    let args = match parse_args() {
        Ok(args) => args,
        Err(message) if message == "help" => {
            println!("{USAGE}");
            return ExitCode::SUCCESS;
        }
        Err(message) => {
            eprintln!("bench-connect: {message}\n{USAGE}");
            return ExitCode::from(64);
        }
    };
    // One thread: the generator is pinned to one CPU, as wrk is.
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("bench-connect: cannot start runtime: {e}");
            return ExitCode::from(70);
        }
    };
    runtime.block_on(run(args))
}
