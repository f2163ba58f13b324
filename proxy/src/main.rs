//! `outrider-proxy`: parses flags, loads the policy, runs the proxy until SIGTERM/SIGINT.
//! Exit codes: 0 after a drain, 64 (EX_USAGE) for bad flags or an invalid policy, 66
//! (EX_NOINPUT) for an unreadable policy file, 69 (EX_UNAVAILABLE) when a port cannot be bound.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use outrider_proxy::{demo, run, Bootstrap};

const EX_USAGE: u8 = 64;
const EX_NOINPUT: u8 = 66;
const EX_UNAVAILABLE: u8 = 69;
const EX_SOFTWARE: u8 = 70;

/// Outrider sidecar proxy.
#[derive(Debug, Parser)]
#[command(name = "outrider-proxy", version, about)]
struct Cli {
    /// Policy file (YAML).
    #[arg(long, env = "OUTRIDER_POLICY", required_unless_present = "demo")]
    policy: Option<PathBuf>,
    /// Run the embedded example policy and start its example upstreams.
    #[arg(long, conflicts_with = "policy")]
    demo: bool,
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
    /// Runtime worker threads; 1 runs a single-threaded runtime, like a 1-CPU pod wants.
    #[arg(long, env = "OUTRIDER_WORKERS", default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..))]
    workers: u16,
    /// Serve `POST /shutdown` on the admin port (loopback callers only): lets a Job's app stop
    /// its sidecar on clusters without native sidecars.
    #[arg(long, env = "OUTRIDER_SHUTDOWN_ENDPOINT")]
    shutdown_endpoint: bool,
    /// Log filter (tracing env-filter syntax), e.g. `info` or `outrider_proxy=debug`.
    #[arg(long, env = "OUTRIDER_LOG", default_value = "info")]
    log: String,
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let _ = e.print();
            return ExitCode::from(if e.use_stderr() { EX_USAGE } else { 0 });
        }
    };
    init_logging(&cli.log);

    let (source, text) = match &cli.policy {
        Some(path) => match std::fs::read_to_string(path) {
            Ok(text) => (path.display().to_string(), text),
            Err(e) => {
                eprintln!("outrider-proxy: cannot read {}: {e}", path.display());
                return ExitCode::from(EX_NOINPUT);
            }
        },
        None => (
            "embedded demo policy".to_string(),
            demo::DEMO_POLICY.to_string(),
        ),
    };
    let loaded = match outrider_config::load(&source, &text) {
        Ok(loaded) => loaded,
        Err(e) => {
            eprintln!("outrider-proxy: invalid policy:\n{e}");
            return ExitCode::from(EX_USAGE);
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
    let bootstrap = Bootstrap {
        outbound: cli.outbound,
        inbound: cli.inbound,
        admin: cli.admin,
        drain_timeout: cli.drain_timeout.get(),
        workload: cli.workload,
        policy_source: source,
        shutdown_endpoint: cli.shutdown_endpoint,
    };
    runtime.block_on(async move {
        if cli.demo {
            if let Err(e) = demo::start_upstreams(&loaded.policy).await {
                eprintln!("outrider-proxy: cannot start demo upstreams: {e}");
                return ExitCode::from(EX_UNAVAILABLE);
            }
        }
        let running = match run(bootstrap, loaded).await {
            Ok(running) => running,
            Err(e) => {
                eprintln!("outrider-proxy: {e}");
                return ExitCode::from(EX_UNAVAILABLE);
            }
        };
        // A signal or `POST /shutdown` starts the drain; either way the run ends when it does.
        let shared = std::sync::Arc::clone(&running.shared);
        tokio::spawn(async move {
            wait_for_signal().await;
            shared.shutdown();
        });
        running.wait().await;
        ExitCode::SUCCESS
    })
}

async fn wait_for_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        // Without signal handlers the process can only be killed; run until then.
        std::future::pending::<()>().await;
        return;
    };
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM received"),
        _ = int.recv() => tracing::info!("SIGINT received"),
    }
}

fn init_logging(filter: &str) {
    let filter = tracing_subscriber::EnvFilter::try_new(filter)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .json()
        .flatten_event(true)
        .with_current_span(false)
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
}
