//! `outrider-proxy`: parses flags, loads the policy, runs the proxy until SIGTERM/SIGINT.
//! Exit codes: 0 after a drain, 64 (EX_USAGE) for bad flags or an invalid policy, 66
//! (EX_NOINPUT) for an unreadable policy file, 69 (EX_UNAVAILABLE) when a port cannot be bound.
//! `outrider-proxy init` installs the transparent-capture rules instead (see `capture`).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use crate::control::certificate::IdentityConfig;
use crate::control::client::Token;
use crate::control::register::RegistrationConfig;
use crate::control::replicas::Replicas;
use crate::control::subscribe::{self, ControlConfig};
use crate::control::watch_file;
use crate::http::shared::PolicySource;
use crate::io::connection::{ConnectionLimits, ConnectionTimeouts, DEFAULT_ADMIN_CONNECTIONS};
use crate::logging::LogFormat;
use crate::{demo, start, Bootstrap, Initial};
use clap::{Parser, Subcommand};

const EX_USAGE: u8 = 64;
const EX_NOINPUT: u8 = 66;
const EX_UNAVAILABLE: u8 = 69;
const EX_SOFTWARE: u8 = 70;

/// Outrider sidecar proxy.
#[derive(Debug, Parser)]
#[command(
    name = "outrider-proxy",
    version,
    about,
    subcommand_negates_reqs = true
)]
struct Cli {
    /// Without a subcommand, the proxy runs.
    #[command(subcommand)]
    command: Option<Command>,
    /// Policy file (YAML), reloaded whenever it changes.
    #[arg(long, env = "OUTRIDER_POLICY", required_unless_present_any = ["demo", "control"], conflicts_with = "control")]
    policy: Option<PathBuf>,
    /// Run the embedded example policy and start its example upstreams.
    #[arg(long, conflicts_with_all = ["policy", "control"])]
    demo: bool,
    /// Control plane to subscribe to for this workload's policy, e.g.
    /// http://outrider-control:15010. Several replicas: comma-separated or the flag repeated
    /// (a name resolving to several addresses counts each); the proxy moves to the next
    /// whenever its subscription ends or cannot connect.
    #[arg(long, env = "OUTRIDER_CONTROL", value_delimiter = ',')]
    control: Vec<String>,
    /// File holding the control-plane token (re-read at every reconnect); or set
    /// OUTRIDER_CONTROL_TOKEN.
    #[arg(long, env = "OUTRIDER_CONTROL_TOKEN_FILE")]
    token_file: Option<PathBuf>,
    /// Register this workload in the control plane's service registry as an endpoint of
    /// SERVICE (comma-separated or repeated for several), while the proxy is ready: callers
    /// whose policy has `discovery: registry` for it send to `--advertise`. On drain the proxy
    /// deregisters first and keeps its inbound port open for `--deregister-delay`.
    #[arg(
        long = "register",
        env = "OUTRIDER_REGISTER",
        value_delimiter = ',',
        requires = "control"
    )]
    register: Vec<String>,
    /// The address callers reach this proxy's inbound port at, registered with `--register`.
    /// Default: the inbound listener's address, when it is not a wildcard (0.0.0.0, [::]).
    #[arg(long, env = "OUTRIDER_ADVERTISE", requires = "register")]
    advertise: Option<SocketAddr>,
    /// With `--register`, how long the inbound port keeps accepting after the drain's
    /// deregistration: callers are pushed the endpoint set without this proxy within it.
    #[arg(long, env = "OUTRIDER_DEREGISTER_DELAY", default_value = "2s")]
    deregister_delay: outrider_config::Duration,
    /// This proxy's id in the control plane's status (default: hostname/pid).
    #[arg(long, env = "OUTRIDER_PROXY_ID")]
    proxy_id: Option<String>,
    /// Directory where the last good control-plane policy is persisted, and read at start.
    #[arg(long, env = "OUTRIDER_STATE_DIR")]
    state_dir: Option<PathBuf>,
    /// Shared outbound listener (apps send here by Host or as HTTP_PROXY).
    #[arg(long, env = "OUTRIDER_OUTBOUND", default_value = "127.0.0.1:15001")]
    outbound: SocketAddr,
    /// Inbound listener, in front of the local app.
    #[arg(long, env = "OUTRIDER_INBOUND", default_value = "0.0.0.0:15006")]
    inbound: SocketAddr,
    /// Admin listener (/live, /ready, /metrics, /config).
    #[arg(long, env = "OUTRIDER_ADMIN", default_value = "127.0.0.1:15000")]
    admin: SocketAddr,
    /// Longest wait for in-flight requests on shutdown.
    #[arg(long, env = "OUTRIDER_DRAIN_TIMEOUT", default_value = "30s")]
    drain_timeout: outrider_config::Duration,
    /// This workload's name.
    #[arg(long, env = "OUTRIDER_WORKLOAD", default_value = "default")]
    workload: String,
    /// PEM file of the CA an `https://` OTLP collector (`tracing.otlp.endpoint`) is verified
    /// against; default: the system's trust roots.
    #[arg(long, env = "OUTRIDER_OTLP_CA_FILE")]
    otlp_ca_file: Option<std::path::PathBuf>,
    /// Most endpoints of one service labelled by address at once in the upstream connection
    /// metrics; past it, new endpoints are counted as `endpoint="other"` (0: all of them), so
    /// a large or churning service cannot grow the series without bound.
    #[arg(long, env = "OUTRIDER_METRICS_ENDPOINT_CAP", default_value_t = crate::telemetry::metrics::DEFAULT_ENDPOINT_CAP)]
    metrics_endpoint_cap: usize,
    /// Runtime worker threads; 1 runs a single-threaded runtime, like a 1-CPU pod wants.
    #[arg(long, env = "OUTRIDER_WORKERS", default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..))]
    workers: u16,
    /// Serve `POST /shutdown` on the admin port (loopback callers only): lets a Job's app stop
    /// its sidecar on clusters without native sidecars.
    #[arg(long, env = "OUTRIDER_SHUTDOWN_ENDPOINT")]
    shutdown_endpoint: bool,
    /// This workload's Kubernetes namespace, for its mesh identity.
    #[arg(long, env = "OUTRIDER_NAMESPACE", default_value = "default")]
    namespace: String,
    /// This workload's service account: turns mesh mTLS on, with the identity
    /// spiffe://<trust-domain>/ns/<namespace>/sa/<service-account> certified by the control plane.
    #[arg(long, env = "OUTRIDER_SERVICE_ACCOUNT", requires = "control")]
    service_account: Option<String>,
    /// The pod's projected service-account token (re-read at each subscription and certificate
    /// request), for a control plane that serves policy and certificates only to the service
    /// account a token proves (`outrider-control serve --sa-jwks`).
    #[arg(long, env = "OUTRIDER_IDENTITY_TOKEN_FILE", requires = "control")]
    identity_token_file: Option<PathBuf>,
    /// From accept to the first complete request head: the inbound TLS sniff and handshake,
    /// protocol detection, the HTTP/1.1 head or the HTTP/2 preface and first HEADERS. An
    /// HTTP/1.1 head begun but not finished is answered 408; anything else is closed.
    #[arg(long, env = "OUTRIDER_HEADER_READ_TIMEOUT", default_value = "10s")]
    header_read_timeout: outrider_config::Duration,
    /// A downstream connection with no request in progress for this long is closed: HTTP/1.1
    /// between a response and the next complete head, HTTP/2 with no open stream (GOAWAY).
    #[arg(long, env = "OUTRIDER_IDLE_TIMEOUT", default_value = "60s")]
    idle_timeout: outrider_config::Duration,
    /// HTTP/2 keepalive: a PING this often on downstream connections, so a dead peer is found.
    #[arg(long, env = "OUTRIDER_HTTP2_KEEPALIVE_INTERVAL", default_value = "30s")]
    http2_keepalive_interval: outrider_config::Duration,
    /// A keepalive PING not answered within this closes the HTTP/2 connection.
    #[arg(long, env = "OUTRIDER_HTTP2_KEEPALIVE_TIMEOUT", default_value = "10s")]
    http2_keepalive_timeout: outrider_config::Duration,
    /// Transparent capture: longest wait for a captured connection's first bytes to tell its
    /// protocol (HTTP/1.x, h2c, TLS) before it is proxied as opaque TCP (see README,
    /// "Transparent capture").
    #[arg(long, env = "OUTRIDER_DETECT_TIMEOUT", default_value = "1s")]
    detect_timeout: outrider_config::Duration,
    /// Transparent capture: a connection proxied as opaque TCP with no byte either way for
    /// this long is closed.
    #[arg(long, env = "OUTRIDER_TCP_IDLE_TIMEOUT", default_value = "1h")]
    tcp_idle_timeout: outrider_config::Duration,
    /// Most connections the inbound port holds; more are closed at accept. Default: derived
    /// from the descriptor limit (see README, "Connection limits").
    #[arg(long, env = "OUTRIDER_MAX_INBOUND_CONNECTIONS", value_parser = clap::value_parser!(u32).range(1..))]
    max_inbound_connections: Option<u32>,
    /// Most connections the outbound port and the dedicated service ports hold together.
    /// Default: derived from the descriptor limit.
    #[arg(long, env = "OUTRIDER_MAX_OUTBOUND_CONNECTIONS", value_parser = clap::value_parser!(u32).range(1..))]
    max_outbound_connections: Option<u32>,
    /// Most connections the admin port holds.
    #[arg(long, env = "OUTRIDER_MAX_ADMIN_CONNECTIONS", default_value_t = DEFAULT_ADMIN_CONNECTIONS, value_parser = clap::value_parser!(u32).range(1..))]
    max_admin_connections: u32,
    /// The app's probes to perform on `GET /app-health/<container>/<kind>` of the admin port,
    /// as `outriderctl inject` writes them: a JSON object from `<container>/<liveness|
    /// readiness|startup>` to the original probe (`httpGet`, `tcpSocket` or `grpc` with a
    /// numeric port, and `timeoutSeconds`). Default: none.
    #[arg(long, env = "OUTRIDER_APP_PROBES", default_value = "")]
    app_probes: String,
    /// The pod's IP address: where the app's probes connect (the port is the probe's).
    /// Default: 127.0.0.1.
    #[arg(long, env = "OUTRIDER_POD_IP")]
    pod_ip: Option<std::net::IpAddr>,
    /// Log filter (tracing env-filter syntax), e.g. `info` or `outrider_proxy=debug`.
    #[arg(long, env = "OUTRIDER_LOG", default_value = "info")]
    log: String,
    /// Format of the proxy's own log lines on stderr: `json` or `text` (the access log's
    /// format is the policy's `access_log`).
    #[arg(long, env = "OUTRIDER_LOG_FORMAT", value_enum, default_value_t = LogFormat::Json)]
    log_format: LogFormat,
}

/// Subcommands of the same binary, so the image stays one.
#[derive(Debug, Subcommand)]
enum Command {
    /// Install (or with --cleanup remove) the netfilter rules that redirect the pod's TCP to
    /// the proxy; run in the pod's network namespace with NET_ADMIN and NET_RAW.
    Init(crate::capture::InitArgs),
}

/// Runs `outrider-proxy` with the process's arguments and returns its exit code. The binary that
/// calls it installs mimalloc as its global allocator (`outrider-proxy`'s own, and
/// `outrider-control` when run by the name `outrider-proxy`).
pub fn run() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let _ = e.print();
            return ExitCode::from(if e.use_stderr() { EX_USAGE } else { 0 });
        }
    };
    if let Some(Command::Init(args)) = &cli.command {
        return match crate::capture::run(args, &mut std::io::stdout()) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("outrider-proxy init: {e}");
                ExitCode::from(e.exit_code())
            }
        };
    }
    crate::logging::init(&cli.log, cli.log_format);

    let deadlines = [
        ("--header-read-timeout", cli.header_read_timeout),
        ("--idle-timeout", cli.idle_timeout),
        ("--http2-keepalive-interval", cli.http2_keepalive_interval),
        ("--http2-keepalive-timeout", cli.http2_keepalive_timeout),
    ];
    if let Some((flag, _)) = deadlines.iter().find(|(_, d)| d.get().is_zero()) {
        // A zero deadline would close every connection before its first byte.
        eprintln!("outrider-proxy: {flag} must be more than 0");
        return ExitCode::from(EX_USAGE);
    }

    let app_probes = match crate::app_probe::AppProbes::parse(&cli.app_probes, cli.pod_ip) {
        Ok(probes) => std::sync::Arc::new(probes),
        Err(e) => {
            eprintln!("outrider-proxy: {e}");
            return ExitCode::from(EX_USAGE);
        }
    };
    let control = match control_config(&cli) {
        Ok(control) => control,
        Err(message) => {
            eprintln!("outrider-proxy: {message}");
            return ExitCode::from(EX_USAGE);
        }
    };
    let registration = match registration_config(&cli, control.as_ref()) {
        Ok(registration) => registration,
        Err(message) => {
            eprintln!("outrider-proxy: {message}");
            return ExitCode::from(EX_USAGE);
        }
    };
    let (origin, initial) = match (&cli.policy, &control) {
        (Some(path), _) => {
            let source = path.display().to_string();
            let text = match std::fs::read_to_string(path) {
                Ok(text) => text,
                Err(e) => {
                    eprintln!("outrider-proxy: cannot read {source}: {e}");
                    return ExitCode::from(EX_NOINPUT);
                }
            };
            match load(&source, &text, PolicySource::File) {
                Ok(initial) => (source, Some(initial)),
                Err(code) => return code,
            }
        }
        (None, Some(control)) => {
            // The last good policy, if any: served until the control plane says otherwise.
            let persisted = control
                .state_dir
                .as_deref()
                .and_then(|dir| subscribe::load_persisted(dir, &control.workload));
            let initial = persisted.map(|(loaded, version)| {
                tracing::info!(version, "starting with the persisted policy");
                Initial {
                    loaded,
                    version,
                    source: PolicySource::Disk,
                }
            });
            (control.replicas.describe(), initial)
        }
        (None, None) => {
            let source = "embedded demo policy".to_string();
            match load(&source, demo::DEMO_POLICY, PolicySource::Embedded) {
                Ok(initial) => (source, Some(initial)),
                Err(code) => return code,
            }
        }
    };

    let runtime = if cli.workers == 1 {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
    } else {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(usize::from(cli.workers))
            .enable_all()
            .build()
    };
    let runtime = match runtime {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("outrider-proxy: cannot start runtime: {e}");
            return ExitCode::from(EX_SOFTWARE);
        }
    };
    let identity = match (&cli.service_account, &control) {
        (Some(service_account), Some(control)) => Some(IdentityConfig {
            control: control.clone(),
            namespace: cli.namespace.clone(),
            service_account: service_account.clone(),
        }),
        _ => None,
    };
    let limits = connection_limits(&cli);
    let timeouts = ConnectionTimeouts {
        header_read: cli.header_read_timeout.get(),
        idle: cli.idle_timeout.get(),
        http2_keepalive_interval: cli.http2_keepalive_interval.get(),
        http2_keepalive_timeout: cli.http2_keepalive_timeout.get(),
        detect: cli.detect_timeout.get(),
        tcp_idle: cli.tcp_idle_timeout.get(),
    };
    let bootstrap = Bootstrap {
        outbound: cli.outbound,
        inbound: cli.inbound,
        admin: cli.admin,
        drain_timeout: cli.drain_timeout.get(),
        workload: cli.workload.clone(),
        policy_source: origin,
        shutdown_endpoint: cli.shutdown_endpoint,
        identity,
        timeouts,
        limits,
        app_probes,
        otlp_ca_file: cli.otlp_ca_file.clone(),
        metrics_endpoint_cap: cli.metrics_endpoint_cap,
        registration,
    };
    runtime.block_on(async move {
        // Handlers first: a SIGTERM that arrives as soon as the listeners are bound (a pod
        // deleted right after it started) must start the drain, not kill the process.
        let signals = crate::core::shutdown::Signals::install();
        if let (true, Some(initial)) = (cli.demo, &initial) {
            if let Err(e) = demo::start_upstreams(&initial.loaded.policy).await {
                eprintln!("outrider-proxy: cannot start demo upstreams: {e}");
                return ExitCode::from(EX_UNAVAILABLE);
            }
        }
        let running = match start(bootstrap, initial).await {
            Ok(running) => running,
            Err(e) => {
                eprintln!("outrider-proxy: {e}");
                return ExitCode::from(EX_UNAVAILABLE);
            }
        };
        if cli.demo {
            eprint!(
                "{}",
                demo::try_these(
                    running.outbound,
                    running.inbound,
                    running.admin,
                    &running.dedicated
                )
            );
        }
        if let Some(path) = cli.policy.clone() {
            if let Err(e) = watch_file::spawn(path, std::sync::Arc::clone(&running.reloader)) {
                // Serving the policy that loaded matters more than reloading it.
                tracing::error!(error = %e, "policy file changes will not be picked up");
            }
        }
        if let Some(control) = control {
            subscribe::spawn(control, std::sync::Arc::clone(&running.reloader));
        }
        // A signal or `POST /shutdown` starts the drain; either way the run ends when it does.
        let shared = std::sync::Arc::clone(&running.shared);
        tokio::spawn(async move {
            signals.wait().await;
            shared.shutdown();
        });
        running.wait().await;
        ExitCode::SUCCESS
    })
}

/// Raises the soft descriptor limit to the hard one (a sidecar's connections are its job),
/// and sets each listener's connection cap: from the flags, or derived from that limit.
fn connection_limits(cli: &Cli) -> ConnectionLimits {
    let before = rlimit::getrlimit(rlimit::Resource::NOFILE).map_or(0, |(soft, _)| soft);
    // The hard limit may be "unlimited", which Linux refuses as a soft limit; then its
    // ceiling for a process (fs.nr_open, 1Mi by default) is the most that can be asked.
    let fd_limit = rlimit::increase_nofile_limit(u64::MAX)
        .or_else(|_| rlimit::increase_nofile_limit(1 << 20))
        .unwrap_or(before);
    let derived = ConnectionLimits::for_fd_limit(fd_limit, cli.max_admin_connections);
    let limits = ConnectionLimits {
        inbound: cli.max_inbound_connections.unwrap_or(derived.inbound),
        outbound: cli.max_outbound_connections.unwrap_or(derived.outbound),
        admin: cli.max_admin_connections,
    };
    tracing::info!(
        fd_limit,
        max_inbound_connections = limits.inbound,
        max_outbound_connections = limits.outbound,
        max_admin_connections = limits.admin,
        "connection limits"
    );
    if limits.descriptors_needed() > fd_limit {
        tracing::warn!(
            fd_limit,
            needed = limits.descriptors_needed(),
            "the connection caps can use more descriptors than the limit allows: a flood on \
             one listener may starve the others"
        );
    }
    limits
}

/// Loads policy `text` (named `source` in diagnostics) as the initial policy.
fn load(source: &str, text: &str, kind: PolicySource) -> Result<Initial, ExitCode> {
    match outrider_config::load(source, text) {
        Ok(loaded) => Ok(Initial {
            loaded,
            version: 1,
            source: kind,
        }),
        Err(e) => {
            eprintln!("outrider-proxy: invalid policy:\n{e}");
            Err(ExitCode::from(EX_USAGE))
        }
    }
}

/// The control-plane settings, when `--control` is given.
fn control_config(cli: &Cli) -> Result<Option<ControlConfig>, String> {
    if cli.control.is_empty() {
        return Ok(None);
    }
    let replicas = Replicas::parse(&cli.control).map_err(|e| e.to_string())?;
    let token = match (&cli.token_file, std::env::var("OUTRIDER_CONTROL_TOKEN")) {
        (Some(path), _) => Token::File(path.clone()),
        (None, Ok(token)) if !token.trim().is_empty() => Token::Value(token),
        _ => {
            return Err(
                "--control needs a token: --token-file FILE or OUTRIDER_CONTROL_TOKEN".into(),
            )
        }
    };
    let proxy_id = cli.proxy_id.clone().unwrap_or_else(|| {
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|h| h.trim().to_string())
            .or_else(|_| std::env::var("HOSTNAME"))
            .unwrap_or_else(|_| "unknown".into());
        format!("{host}/{}", std::process::id())
    });
    if cli.state_dir.is_none() {
        tracing::warn!(
            "no --state-dir: a restart while the control plane is down starts with no policy"
        );
    }
    Ok(Some(ControlConfig {
        replicas: std::sync::Arc::new(replicas),
        token,
        proxy_id,
        workload: cli.workload.clone(),
        state_dir: cli.state_dir.clone(),
        service_account_token: cli.identity_token_file.clone(),
    }))
}

/// What to register with `--register`, checked: an address callers can reach.
fn registration_config(
    cli: &Cli,
    control: Option<&ControlConfig>,
) -> Result<Option<RegistrationConfig>, String> {
    let (false, Some(control)) = (cli.register.is_empty(), control) else {
        return Ok(None);
    };
    let service_name = |s: &str| {
        !s.is_empty()
            && s.len() <= 253
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_'))
    };
    if let Some(bad) = cli.register.iter().find(|s| !service_name(s)) {
        return Err(format!(
            "--register {bad:?}: a service name holds only letters, digits, '-', '.' and '_'"
        ));
    }
    if cli.register.len() > outrider_config::wire::MAX_REGISTERED_SERVICES {
        return Err(format!(
            "--register: at most {} services",
            outrider_config::wire::MAX_REGISTERED_SERVICES
        ));
    }
    // Port 0 is settled at bind; a wildcard cannot be.
    let inbound = SocketAddr::new(cli.inbound.ip(), cli.inbound.port().max(1));
    crate::control::register::advertised(cli.advertise, inbound)?;
    Ok(Some(RegistrationConfig {
        control: control.clone(),
        services: cli.register.clone(),
        advertise: cli.advertise,
        deregister_delay: cli.deregister_delay.get(),
    }))
}
