//! `outrider-control`: the control-plane server. Exit codes: 0 after SIGTERM/SIGINT, 64
//! (EX_USAGE) bad flags or no token, 66 (EX_NOINPUT) unreadable policy directory, token file
//! or service-account JWKS, 69 (EX_UNAVAILABLE) the listen address cannot be bound or etcd
//! (`--store etcd://...`) cannot be reached at start, 73 (EX_CANTCREAT) the state directory
//! (or the state in etcd) cannot be used.
//!
//! Called by the name `outriderctl` (the image's symlink to this binary) it is the CLI, exactly
//! as the `outriderctl` binary: the two share most of their code, which the image then holds
//! once.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::{Parser, Subcommand};
use outrider_control::ca::Ca;
use outrider_control::discovery::{self, ServiceRegistry};
use outrider_control::engine::{Engine, EngineError};
use outrider_control::etcd::{self, EtcdConfig, EtcdStore};
use outrider_control::replica::{self, Replica};
use outrider_control::server::{serve, App};
use outrider_control::service_account::ServiceAccountTokens;
use outrider_control::store::Store;
use outrider_control::watcher;

#[path = "outriderctl.rs"]
mod outriderctl;

const EX_USAGE: u8 = 64;
const EX_NOINPUT: u8 = 66;
const EX_UNAVAILABLE: u8 = 69;
const EX_SOFTWARE: u8 = 70;
const EX_CANTCREAT: u8 = 73;

/// Outrider control plane.
#[derive(Debug, Parser)]
#[command(name = "outrider-control", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Serves policy: watches a directory of YAML documents and pushes each workload's merged
    /// policy to its proxies.
    Serve(Serve),
}

#[derive(Debug, clap::Args)]
struct Serve {
    /// Directory of policy documents (`*.yaml`, `*.yml`), watched; a ConfigMap volume works.
    #[arg(long, env = "OUTRIDER_CONTROL_POLICIES")]
    policies: PathBuf,
    /// Directory for versions and history (created if missing): the embedded store of a
    /// single replica. Either this or `--store`.
    #[arg(
        long,
        env = "OUTRIDER_CONTROL_STATE",
        required_unless_present = "store",
        conflicts_with = "store"
    )]
    state: Option<PathBuf>,
    /// The store several replicas share, instead of `--state`: `etcd://host1:2379,host2:2379`
    /// (every member, or a load balancer in front of them). Documents, versions, history and
    /// the generated CA live there; each replica serves from a view kept by an etcd watch.
    #[arg(long, env = "OUTRIDER_CONTROL_STORE")]
    store: Option<String>,
    /// Prefix of every key in etcd (several meshes can share one etcd under different ones).
    #[arg(long, env = "OUTRIDER_CONTROL_ETCD_PREFIX", default_value = etcd::DEFAULT_PREFIX, requires = "store")]
    etcd_prefix: String,
    /// CA certificate (PEM) to verify etcd's serving certificates: TLS to etcd when set.
    #[arg(long, env = "OUTRIDER_CONTROL_ETCD_CA", requires = "store")]
    etcd_ca: Option<PathBuf>,
    /// Client certificate (PEM) for etcd's `--client-cert-auth` (TLS to etcd).
    #[arg(long, env = "OUTRIDER_CONTROL_ETCD_CERT", requires_all = ["store", "etcd_key"])]
    etcd_cert: Option<PathBuf>,
    /// Private key (PEM) of `--etcd-cert`.
    #[arg(long, env = "OUTRIDER_CONTROL_ETCD_KEY", requires = "etcd_cert")]
    etcd_key: Option<PathBuf>,
    /// etcd user (etcd's `auth enable`); its password is read from `--etcd-password-file`.
    #[arg(long, env = "OUTRIDER_CONTROL_ETCD_USER", requires_all = ["store", "etcd_password_file"])]
    etcd_user: Option<String>,
    /// File holding the password of `--etcd-user`.
    #[arg(
        long,
        env = "OUTRIDER_CONTROL_ETCD_PASSWORD_FILE",
        requires = "etcd_user"
    )]
    etcd_password_file: Option<PathBuf>,
    /// Deadline of each request to etcd; a change etcd does not confirm within it is not made.
    /// From 100ms to 1m: deadlines are computed from it, so it is bounded where it is read.
    #[arg(
        long,
        env = "OUTRIDER_CONTROL_ETCD_TIMEOUT",
        default_value = "3s",
        value_parser = parse_etcd_timeout
    )]
    etcd_timeout: std::time::Duration,
    /// TTL of the etcd lease each replica holds (kept alive at a third of it): a dead
    /// replica's leadership moves, and its proxies leave `status`, within about this. From 2s
    /// (etcd's shortest lease) to 1m.
    #[arg(
        long,
        env = "OUTRIDER_CONTROL_LEASE_TTL",
        default_value = "5s",
        value_parser = parse_lease_ttl
    )]
    lease_ttl: std::time::Duration,
    /// A replica whose view has been behind etcd (watch down, no quorum) for longer than this
    /// says so in `/ready` and `status`. From 1s to 1h.
    #[arg(
        long,
        env = "OUTRIDER_CONTROL_VIEW_STALE_AFTER",
        default_value = "10s",
        value_parser = parse_view_stale_after
    )]
    view_stale_after: std::time::Duration,
    /// This replica's name among the replicas on etcd (shown in `status`, its election
    /// value, its proxies' key): unique per replica. Default: the host name and process id.
    #[arg(long, env = "OUTRIDER_CONTROL_REPLICA_NAME", value_parser = parse_replica_name)]
    replica_name: Option<String>,
    /// Address to serve proxies and `outriderctl` on (HTTP/1.1 and h2c).
    #[arg(
        long,
        env = "OUTRIDER_CONTROL_LISTEN",
        default_value = "127.0.0.1:15010"
    )]
    listen: SocketAddr,
    /// File holding the token proxies and operators present; or set OUTRIDER_CONTROL_TOKEN.
    #[arg(long, env = "OUTRIDER_CONTROL_TOKEN_FILE")]
    token_file: Option<PathBuf>,
    /// Seconds between heartbeats on an idle subscription.
    #[arg(long, env = "OUTRIDER_CONTROL_HEARTBEAT", default_value_t = outrider_config::wire::HEARTBEAT_SECS)]
    heartbeat_secs: u64,
    /// Runtime worker threads (0: one per CPU).
    #[arg(long, env = "OUTRIDER_CONTROL_WORKERS", default_value_t = 0)]
    workers: usize,
    /// Largest update a change may push to a proxy, in bytes (the merged policy as sent); a
    /// change that would exceed it for any workload is rejected. At most, and by default,
    /// what a proxy reads (16 MiB).
    #[arg(long, env = "OUTRIDER_CONTROL_MAX_PUSH_BYTES", default_value_t = outrider_config::wire::MAX_LINE,
          value_parser = clap::value_parser!(usize))]
    max_push_bytes: usize,
    /// Mesh CA certificate (PEM; the first certificate signs, any others go in the trust
    /// bundle). Without it, a CA is generated in the state directory at first start.
    #[arg(long, env = "OUTRIDER_CONTROL_CA_CERT", requires = "ca_key")]
    ca_cert: Option<PathBuf>,
    /// Private key of `--ca-cert` (PEM).
    #[arg(long, env = "OUTRIDER_CONTROL_CA_KEY", requires = "ca_cert")]
    ca_key: Option<PathBuf>,
    /// SPIFFE trust domain of issued identities.
    #[arg(long, env = "OUTRIDER_TRUST_DOMAIN", default_value = "cluster.local")]
    trust_domain: String,
    /// Lifetime of issued workload certificates (proxies renew at about 70% of it).
    #[arg(long, env = "OUTRIDER_CONTROL_CERT_TTL", default_value = "24h")]
    cert_ttl: outrider_config::Duration,
    /// Bind certificates to Kubernetes service accounts: the JWKS of the cluster's
    /// service-account token issuer (`kubectl get --raw /openid/v1/jwks`), re-read when it
    /// changes. A proxy then gets a certificate only for the service account its pod's
    /// projected token proves. Without it, the API token entitles to any identity.
    #[arg(long, env = "OUTRIDER_CONTROL_SA_JWKS")]
    sa_jwks: Option<PathBuf>,
    /// The `iss` service-account tokens must carry (the cluster's
    /// `--service-account-issuer`); unchecked when unset.
    #[arg(long, env = "OUTRIDER_CONTROL_SA_ISSUER", requires = "sa_jwks")]
    sa_issuer: Option<String>,
    /// The audience service-account tokens must be minted for.
    #[arg(long, env = "OUTRIDER_CONTROL_SA_AUDIENCE", default_value = outrider_control::service_account::DEFAULT_AUDIENCE)]
    sa_audience: String,
    /// How long after its last stream closed a proxy's record, and a workload no document
    /// names, are forgotten (so made-up or departed names cannot grow the registry, and the
    /// work of every change, without bound).
    #[arg(long, env = "OUTRIDER_CONTROL_REGISTRY_EXPIRY", default_value = "5m")]
    registry_expiry: outrider_config::Duration,
    /// How long a proxy's registration (`outrider-proxy --register`) lives unless renewed
    /// (proxies renew at a third of it): a proxy that dies leaves its services' endpoints
    /// within about this. From 1s to 5m.
    #[arg(
        long,
        env = "OUTRIDER_CONTROL_REGISTRATION_TTL",
        default_value = "10s",
        value_parser = parse_registration_ttl
    )]
    registration_ttl: std::time::Duration,
    /// Log filter (tracing env-filter syntax).
    #[arg(long, env = "OUTRIDER_LOG", default_value = "info")]
    log: String,
    /// Format of the log lines on stderr: `json` or `text`.
    #[arg(long, env = "OUTRIDER_LOG_FORMAT", value_enum, default_value_t = LogFormat::Json)]
    log_format: LogFormat,
}

/// How log lines are written (`--log-format`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum LogFormat {
    /// One JSON object per line.
    Json,
    /// `timestamp LEVEL target: message field=value ...`, for people.
    Text,
}

/// mimalloc, as `outrider-proxy`'s own binary: this binary runs the proxy too (below).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    // One binary for the image, called by three names (its symlinks): the code the control
    // plane, the CLI and the proxy share (tokio, hyper, rustls and aws-lc, the policy parser)
    // is in it once, which keeps the image within its size budget.
    match called_as() {
        Some(Name::Cli) => return outriderctl::main(),
        Some(Name::Proxy) => return outrider_proxy::cli::run(),
        None => {}
    }
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let _ = e.print();
            return ExitCode::from(if e.use_stderr() { EX_USAGE } else { 0 });
        }
    };
    let Command::Serve(args) = cli.command;
    init_logging(&args.log, args.log_format);
    // One descriptor per connected proxy: lift the soft limit to the hard one, as a server
    // meant to hold thousands of streams must.
    if let Err(e) = rlimit::increase_nofile_limit(u64::MAX) {
        tracing::warn!(error = %e, "cannot raise RLIMIT_NOFILE");
    }
    let token = match read_token(args.token_file.as_deref()) {
        Ok(token) => token,
        Err((code, message)) => {
            eprintln!("outrider-control: {message}");
            return ExitCode::from(code);
        }
    };
    if !args.policies.is_dir() {
        eprintln!(
            "outrider-control: {} is not a readable directory",
            args.policies.display()
        );
        return ExitCode::from(EX_NOINPUT);
    }
    if args.max_push_bytes > outrider_config::wire::MAX_LINE {
        eprintln!(
            "outrider-control: --max-push-bytes {} is more than a proxy reads ({})",
            args.max_push_bytes,
            outrider_config::wire::MAX_LINE
        );
        return ExitCode::from(EX_USAGE);
    }
    let mut runtime = tokio::runtime::Builder::new_multi_thread();
    if args.workers > 0 {
        runtime.worker_threads(args.workers);
    }
    let runtime = match runtime.enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("outrider-control: cannot start runtime: {e}");
            return ExitCode::from(EX_SOFTWARE);
        }
    };
    // Installed as soon as the runtime exists: a signal while the store opens or before the
    // API listens (a pod deleted as it starts) is kept for the serve loop, instead of killing
    // the process by the default action mid-write.
    let signals = {
        let _context = runtime.enter();
        outrider_proxy::core::shutdown::Signals::install()
    };
    let store = match open_store(&args, &runtime) {
        Ok(store) => store,
        Err((code, message)) => {
            eprintln!("outrider-control: {message}");
            return ExitCode::from(code);
        }
    };
    let etcd_store = store.etcd_store().cloned();
    let replica_name = args
        .replica_name
        .clone()
        .unwrap_or_else(default_replica_name);
    let replica = Arc::new(match &etcd_store {
        Some(etcd) => Replica::on_etcd(replica_name, etcd.clone(), args.view_stale_after),
        None => Replica::single(replica_name),
    });
    let engine = match Engine::open(store) {
        Ok(engine) => Arc::new(engine.max_push(args.max_push_bytes)),
        Err(EngineError::Load(e)) if e.is_unavailable() => {
            eprintln!("outrider-control: {e}");
            return ExitCode::from(EX_UNAVAILABLE);
        }
        Err(e) => {
            eprintln!("outrider-control: {e}");
            return ExitCode::from(EX_CANTCREAT);
        }
    };
    let ttl = args.cert_ttl.get();
    let ca = match (&args.ca_cert, &args.ca_key, &args.state, &etcd_store) {
        (Some(cert), Some(key), _, _) => Ca::from_files(cert, key, &args.trust_domain, ttl),
        (_, _, _, Some(etcd)) => Ca::shared(etcd, &args.trust_domain, ttl),
        (_, _, Some(state), None) => Ca::open_or_generate(state, &args.trust_domain, ttl),
        // Clap requires --state or --store.
        (_, _, None, None) => {
            eprintln!("outrider-control: --state or --store is required");
            return ExitCode::from(EX_USAGE);
        }
    };
    let ca = match ca {
        Ok(ca) => Arc::new(ca),
        Err(e) => {
            eprintln!("outrider-control: mesh CA: {e}");
            return ExitCode::from(EX_CANTCREAT);
        }
    };
    let service_accounts = match &args.sa_jwks {
        Some(path) => {
            match ServiceAccountTokens::open(path, args.sa_issuer.clone(), args.sa_audience.clone())
            {
                Ok(tokens) => Some(Arc::new(tokens)),
                Err(e) => {
                    eprintln!("outrider-control: {e}");
                    return ExitCode::from(EX_NOINPUT);
                }
            }
        }
        None => {
            tracing::warn!("no --sa-jwks: certificates are not bound to service accounts; any holder of the API token can obtain any identity");
            None
        }
    };
    runtime.block_on(async move {
        let services = Arc::new(ServiceRegistry::new(args.registration_ttl));
        tokio::spawn(discovery::expire_loop(Arc::clone(&services)));
        if let Some(etcd) = etcd_store {
            tokio::spawn(discovery::publish_registrations(
                etcd.clone(),
                Arc::clone(&services),
                Arc::clone(&replica),
            ));
            tokio::spawn(discovery::watch_registrations(
                etcd.clone(),
                Arc::clone(&services),
                Arc::clone(&replica),
            ));
            tokio::spawn(etcd::keep_view(etcd.clone(), Arc::clone(&engine)));
            tokio::spawn(replica::run_session(
                etcd.clone(),
                Arc::clone(&replica),
                args.lease_ttl,
            ));
            tokio::spawn(replica::publish_proxies(
                etcd,
                Arc::clone(&engine),
                Arc::clone(&replica),
            ));
        }
        // Watches, then (the leader) scans once before listening.
        let _watcher = match watcher::start(
            args.policies.clone(),
            Arc::clone(&engine),
            replica.leadership(),
        ) {
            Ok(w) => w,
            Err(e) => {
                eprintln!(
                    "outrider-control: cannot watch {}: {e}",
                    args.policies.display()
                );
                return ExitCode::from(EX_NOINPUT);
            }
        };
        // Every proxy of the fleet reconnects at once after a restart: the kernel's accept queue
        // is sized for that burst (tokio's default is 128), as the proxy's listeners are.
        let listener = match listen(args.listen) {
            Ok(l) => l,
            Err(e) => {
                eprintln!("outrider-control: cannot listen on {}: {e}", args.listen);
                return ExitCode::from(EX_UNAVAILABLE);
            }
        };
        let listen = listener.local_addr().unwrap_or(args.listen);
        tracing::info!(
            listen = %listen,
            version = engine.version(),
            policies = %args.policies.display(),
            "listening"
        );
        tokio::spawn(outrider_control::engine::expire_gone(
            Arc::clone(&engine),
            args.registry_expiry.get(),
        ));
        let app = Arc::new(App {
            engine,
            token,
            heartbeat: Duration::from_secs(args.heartbeat_secs.max(1)),
            ca: Some(ca),
            service_accounts,
            replica: Arc::clone(&replica),
            services,
        });
        tokio::select! {
            () = serve(listener, app) => {}
            () = signals.wait() => {}
        }
        replica.step_down().await;
        // Every accepted version is already durable; open streams just end and proxies
        // reconnect to the next instance.
        ExitCode::SUCCESS
    })
}

/// The state directory, or etcd (connected, with a leader) for `--store etcd://...`.
fn open_store(args: &Serve, runtime: &tokio::runtime::Runtime) -> Result<Store, (u8, String)> {
    let Some(url) = &args.store else {
        let Some(state) = &args.state else {
            return Err((EX_USAGE, "--state or --store is required".into()));
        };
        return Store::open(state).map_err(|e| (EX_CANTCREAT, e.to_string()));
    };
    let endpoints = etcd::parse_url(url).map_err(|e| (EX_USAGE, format!("--store: {e}")))?;
    let user = match (&args.etcd_user, &args.etcd_password_file) {
        (Some(user), Some(file)) => {
            let password = std::fs::read_to_string(file)
                .map_err(|e| (EX_NOINPUT, format!("cannot read {}: {e}", file.display())))?;
            Some((
                user.clone(),
                password.trim_end_matches(['\r', '\n']).to_string(),
            ))
        }
        _ => None,
    };
    let config = EtcdConfig {
        endpoints,
        prefix: args.etcd_prefix.clone(),
        ca: args.etcd_ca.clone(),
        identity: args.etcd_cert.clone().zip(args.etcd_key.clone()),
        user,
        timeout: args.etcd_timeout,
    };
    let connected = runtime.block_on(EtcdStore::connect(config, runtime.handle().clone()));
    connected
        .map(Store::etcd)
        .map_err(|e| (EX_UNAVAILABLE, e.to_string()))
}

/// `--etcd-timeout`: a duration from 100ms to 1m. Shorter cannot reach a member and back;
/// longer would hold an apply (and the deadlines added to it) for no gain.
fn parse_etcd_timeout(text: &str) -> Result<std::time::Duration, String> {
    let range = std::time::Duration::from_millis(100)..=std::time::Duration::from_secs(60);
    duration_within(text, range, "100ms..=1m")
}

/// `--lease-ttl`: whole seconds (etcd's leases are), within [`replica::LEASE_TTL_RANGE`].
fn parse_lease_ttl(text: &str) -> Result<std::time::Duration, String> {
    let ttl = parse_duration(text)?;
    if ttl.subsec_nanos() != 0 {
        return Err(format!("{text} is not whole seconds (etcd's leases are)"));
    }
    check_within(text, ttl, replica::LEASE_TTL_RANGE, "2s..=1m")
}

/// `--registration-ttl`: within [`discovery::TTL_RANGE`].
fn parse_registration_ttl(text: &str) -> Result<std::time::Duration, String> {
    duration_within(text, discovery::TTL_RANGE, "1s..=5m")
}

/// `--view-stale-after`: from 1s to 1h.
fn parse_view_stale_after(text: &str) -> Result<std::time::Duration, String> {
    let range = std::time::Duration::from_secs(1)..=std::time::Duration::from_secs(3600);
    duration_within(text, range, "1s..=1h")
}

/// A duration flag's value, refused outside `range` (written `shown` in the message): the
/// flags' durations are bounded where they are read, since deadlines are computed from them.
fn duration_within(
    text: &str,
    range: std::ops::RangeInclusive<std::time::Duration>,
    shown: &str,
) -> Result<std::time::Duration, String> {
    check_within(text, parse_duration(text)?, range, shown)
}

fn parse_duration(text: &str) -> Result<std::time::Duration, String> {
    Ok(text
        .parse::<outrider_config::Duration>()
        .map_err(|e| e.to_string())?
        .get())
}

fn check_within(
    text: &str,
    value: std::time::Duration,
    range: std::ops::RangeInclusive<std::time::Duration>,
    shown: &str,
) -> Result<std::time::Duration, String> {
    if range.contains(&value) {
        Ok(value)
    } else {
        Err(format!("{text} is outside {shown}"))
    }
}

/// `--replica-name`: part of etcd keys, so letters, digits, '-', '.', '_' (at most 253).
fn parse_replica_name(text: &str) -> Result<String, String> {
    let valid = !text.is_empty()
        && text.len() <= 253
        && text
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_'));
    if valid {
        Ok(text.to_string())
    } else {
        Err(format!(
            "{text:?} is not a replica name (letters, digits, '-', '.', '_')"
        ))
    }
}

/// The host name (a pod's name in Kubernetes) and the process id: unique per replica.
fn default_replica_name() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
    let host: String = host
        .trim()
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_'))
        .take(200)
        .collect();
    let host = if host.is_empty() {
        "control".to_string()
    } else {
        host
    };
    format!("{host}-{}", std::process::id())
}

fn read_token(file: Option<&std::path::Path>) -> Result<String, (u8, String)> {
    let token = match file {
        Some(path) => std::fs::read_to_string(path)
            .map_err(|e| (EX_NOINPUT, format!("cannot read {}: {e}", path.display())))?,
        None => std::env::var("OUTRIDER_CONTROL_TOKEN").map_err(|_| {
            (
                EX_USAGE,
                "a token is required: --token-file, OUTRIDER_CONTROL_TOKEN_FILE or OUTRIDER_CONTROL_TOKEN"
                    .to_string(),
            )
        })?,
    };
    let token = token.trim().to_string();
    if token.is_empty() {
        return Err((EX_USAGE, "the token is empty".into()));
    }
    Ok(token)
}

/// The other programs this binary is, by the name it was started as.
enum Name {
    /// `outriderctl`, the operator's CLI.
    Cli,
    /// `outrider-proxy`, the sidecar.
    Proxy,
}

/// Which other program argv[0]'s file name asks for, if any.
fn called_as() -> Option<Name> {
    let arg0 = std::env::args_os().next()?;
    match Path::new(&arg0).file_name()?.to_str()? {
        "outriderctl" => Some(Name::Cli),
        "outrider-proxy" => Some(Name::Proxy),
        _ => None,
    }
}

fn init_logging(filter: &str, format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_new(filter)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let logs = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Json => logs
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .init(),
        LogFormat::Text => logs.with_ansi(false).init(),
    }
}

/// Binds the API's listening socket with a backlog of 1024 and `SO_REUSEADDR`.
fn listen(addr: std::net::SocketAddr) -> std::io::Result<tokio::net::TcpListener> {
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(1024)
}
