//! `outriderctl inject`: adds the Outrider sidecar to Kubernetes workload manifests.
//!
//! Input is multi-document YAML. Documents are split at their `---` lines and each is handled
//! alone: Pods, Deployments, StatefulSets, DaemonSets, ReplicaSets, Jobs and CronJobs (also
//! inside a `kind: List`) get the sidecar; every other document, every workload that opts out
//! with `outrider.dev/inject: "false"` and every `hostNetwork` pod (with a warning) is written
//! back byte for byte. Injected documents are re-serialised, so their comments are lost (the
//! value read keeps no comments).
//!
//! By default the pod's traffic is captured: an init container runs `outrider-proxy init`
//! (netfilter rules in the pod's network namespace) and the app is left unaware of the proxy.
//! `--capture=false` (or `outrider.dev/capture: "false"`) keeps the explicit mode, where the
//! app is pointed at the proxy by `HTTP_PROXY`.
//!
//! What is added is typed (`Container`, `Volume`, serialised) and turned into the ordered
//! [`Value`] the pod is edited in; the pod itself stays a value, since its
//! schema is not ours and everything the injector does not own must come back as it was.
//! Injection replaces what an earlier injection added (same container, volume and env names)
//! instead of adding it again, so injecting twice changes nothing.

use std::fmt;
use std::io::Read;
use std::net::IpAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use serde::Serialize;

use outrider_config::app_probe::{
    GrpcRecord, HeaderRecord, HttpGetRecord, PortRecord, ProbeRecord, ProbeRecords,
    MAX_TIMEOUT_SECONDS as MAX_PROBE_TIMEOUT_SECONDS,
};

use crate::yaml::{Mapping, Value};

mod checks;
mod documents;
mod edit;
mod pod;
mod probes;
mod sidecar;
#[cfg(test)]
mod tests;

use self::checks::*;
use self::documents::*;
use self::edit::*;
use self::pod::*;
use self::probes::*;
use self::sidecar::*;

/// Name of the injected container; also how an earlier injection is recognised.
pub const SIDECAR_NAME: &str = "outrider-proxy";
/// Name of the injected init container that installs the capture rules.
pub const INIT_NAME: &str = "outrider-init";
/// Annotation that turns injection off for a workload when `"false"`.
pub const ANNOTATION_INJECT: &str = "outrider.dev/inject";
/// Annotation overriding the sidecar's CPU request.
pub const ANNOTATION_CPU: &str = "outrider.dev/proxy-cpu";
/// Annotation overriding the sidecar's memory request and limit.
pub const ANNOTATION_MEMORY: &str = "outrider.dev/proxy-memory";
/// Annotation overriding the sidecar's drain timeout.
pub const ANNOTATION_DRAIN: &str = "outrider.dev/drain-timeout";
/// Annotation naming the workload the sidecar subscribes as.
pub const ANNOTATION_WORKLOAD: &str = "outrider.dev/workload";
/// Annotation overriding `--capture` for a workload (`"true"` or `"false"`).
pub const ANNOTATION_CAPTURE: &str = "outrider.dev/capture";
/// Annotation: inbound ports (or ranges) that reach the app directly, not through the proxy.
pub const ANNOTATION_SKIP_INBOUND_PORTS: &str = "outrider.dev/skip-inbound-ports";
/// Annotation: outbound destination ports (or ranges) that are not captured.
pub const ANNOTATION_SKIP_OUTBOUND_PORTS: &str = "outrider.dev/skip-outbound-ports";
/// Annotation: outbound destination networks (CIDRs) that are not captured.
pub const ANNOTATION_SKIP_OUTBOUND_CIDRS: &str = "outrider.dev/skip-outbound-cidrs";
/// Written by inject: the outriderctl version that injected the pod.
pub const ANNOTATION_INJECTED_VERSION: &str = "outrider.dev/injected-version";
/// Written by inject: `native` or `legacy` sidecar.
pub const ANNOTATION_INJECTED_SIDECAR: &str = "outrider.dev/injected-sidecar";
/// Written by inject: `capture` (init container and netfilter rules) or `explicit`
/// (`HTTP_PROXY`).
pub const ANNOTATION_INJECTED_TRAFFIC: &str = "outrider.dev/injected-traffic";
/// The container `kubectl logs` and `kubectl exec` pick without `-c`: the app's.
pub const ANNOTATION_DEFAULT_CONTAINER: &str = "kubectl.kubernetes.io/default-container";
/// Label on every injected pod: `outrider.dev/meshed=true` selects the meshed pods.
pub const LABEL_MESHED: &str = "outrider.dev/meshed";

/// The proxy's admin port inside the pod (probes and Prometheus scrape it).
pub const ADMIN_PORT: u16 = 15000;
/// The proxy's shared outbound port, on loopback.
pub const OUTBOUND_PORT: u16 = 15001;
/// The proxy's inbound port.
pub const INBOUND_PORT: u16 = 15006;
/// The UID the proxy runs as (the image's nonroot user); the capture rules exempt its
/// connections, so the two must be the same number.
pub const PROXY_UID: u32 = 65532;

const TOKEN_VOLUME: &str = "outrider-token";
const STATE_VOLUME: &str = "outrider-state";
const TOKEN_DIR: &str = "/var/run/outrider/token";
/// The projected service-account token that proves the pod's identity to the control plane's
/// CA (`outrider-control serve --sa-jwks`).
const IDENTITY_VOLUME: &str = "outrider-identity";
const IDENTITY_DIR: &str = "/var/run/outrider/identity";
/// The audience the token is minted for: it is good for Outrider's control plane only, never
/// for the Kubernetes API.
const IDENTITY_AUDIENCE: &str = "outrider";
/// Lifetime of the projected token (the kubelet refreshes it at 80%); the proxy reads it at
/// each certificate request.
const IDENTITY_TOKEN_SECS: u64 = 3600;
const STATE_DIR: &str = "/var/run/outrider/state";
/// A writable `/run` for the init container, whose root filesystem is read-only: the
/// iptables tools take their lock at `/run/xtables.lock`.
const INIT_RUN_VOLUME: &str = "outrider-init-run";
const INIT_RUN_DIR: &str = "/run";
/// The image's binaries live here (see deploy/Dockerfile).
const BIN_DIR: &str = "/usr/local/bin";
/// Seconds the pod keeps beyond the drain timeout before the kubelet kills it.
const GRACE_MARGIN_SECS: u64 = 5;
/// The explicit mode's proxy URL for the app: the outbound port on loopback.
const PROXY_URL: &str = "http://127.0.0.1:15001";
/// What the explicit mode adds to the app's `NO_PROXY`: loopback stays direct.
const NO_PROXY_ENTRIES: [&str; 3] = ["127.0.0.1", "localhost", "::1"];
/// Env var on the proxy container: the app's probes it performs (`--app-probes`).
const APP_PROBES_ENV: &str = "OUTRIDER_APP_PROBES";
/// Env var on the proxy container: the pod's IP, where those probes connect (`--pod-ip`).
const POD_IP_ENV: &str = "OUTRIDER_POD_IP";
/// Where the admin port serves the app's probes: `/app-health/<container>/<kind>`.
const APP_HEALTH_PREFIX: &str = "/app-health/";
/// Env var telling a legacy run-to-completion pod's app where to stop its sidecar.
const SHUTDOWN_URL_ENV: &str = "OUTRIDER_SHUTDOWN_URL";
/// Most entries in one skip annotation (as `outrider-proxy init` accepts).
const MAX_SKIP_ENTRIES: usize = 64;
/// This injector's version, recorded on every injected pod.
const VERSION: &str = env!("CARGO_PKG_VERSION");

/// Default image: this build's version.
pub const DEFAULT_IMAGE: &str = concat!("outrider/outrider:", env!("CARGO_PKG_VERSION"));

/// `outriderctl inject` flags.
#[derive(Debug, Clone, clap::Args)]
pub struct InjectArgs {
    /// Manifests (multi-document YAML); `-` or none reads standard input.
    #[arg(short = 'f', long = "file")]
    pub files: Vec<PathBuf>,
    /// Manifests given without `-f` (same meaning).
    #[arg(value_name = "FILE")]
    pub paths: Vec<PathBuf>,
    /// Control-plane URL the sidecar subscribes to.
    #[arg(
        long,
        default_value = "http://outrider-control.outrider.svc.cluster.local:15010"
    )]
    pub control: String,
    /// Workload name the sidecar subscribes as; default: the `outrider.dev/workload`
    /// annotation, else the `app.kubernetes.io/name` or `app` label, else the object's name.
    #[arg(long)]
    pub workload: Option<String>,
    /// Sidecar image (also runs the capture init container).
    #[arg(long, default_value = DEFAULT_IMAGE)]
    pub image: String,
    /// Secret holding the control-plane token (key `token`), in the workload's namespace.
    #[arg(long, default_value = "outrider-token")]
    pub token_secret: String,
    /// Policy file: each service with a `listen:` port gives the app `<SERVICE>_ADDR`.
    #[arg(long)]
    pub policy: Option<PathBuf>,
    /// Plain container plus a postStart wait, for clusters without native sidecars (< 1.29).
    #[arg(long)]
    pub legacy: bool,
    /// Capture the pod's TCP with an init container (`outrider-proxy init`, NET_ADMIN and
    /// NET_RAW); `--capture=false` points the app at the proxy with HTTP_PROXY instead.
    /// Annotation `outrider.dev/capture` overrides it per workload.
    #[arg(
        long,
        env = "OUTRIDER_INJECT_CAPTURE",
        default_value_t = true,
        num_args = 0..=1,
        require_equals = true,
        default_missing_value = "true",
        action = clap::ArgAction::Set
    )]
    pub capture: bool,
    /// Sidecar CPU request (annotation `outrider.dev/proxy-cpu`).
    #[arg(long, default_value = "100m")]
    pub proxy_cpu: String,
    /// Sidecar CPU limit.
    #[arg(long, default_value = "1")]
    pub proxy_cpu_limit: String,
    /// Sidecar memory request and limit (annotation `outrider.dev/proxy-memory`).
    #[arg(long, default_value = "128Mi")]
    pub proxy_memory: String,
    /// Drain timeout on shutdown (annotation `outrider.dev/drain-timeout`).
    #[arg(long, default_value = "30s")]
    pub drain_timeout: String,
}

/// Why injection failed.
#[derive(Debug, thiserror::Error)]
pub enum InjectError {
    /// A document is not YAML.
    #[error("{source_name}: document {index}: {error}")]
    Yaml {
        /// File (or `<stdin>`).
        source_name: String,
        /// 1-based document number.
        index: usize,
        /// The parser's message (boxed: the error is large and this path is cold).
        error: Box<serde_saphyr::Error>,
    },
    /// An injected document could not be written back as YAML.
    #[error("{source_name}: document {index}: {error}")]
    Encode {
        /// File (or `<stdin>`).
        source_name: String,
        /// 1-based document number.
        index: usize,
        /// The serializer's message.
        error: serde_saphyr::SerializeError,
    },
    /// A workload has a bad annotation, a bad flag value or an unexpected shape.
    #[error("{object}: {message}")]
    Invalid {
        /// `Kind/name`.
        object: String,
        /// What is wrong.
        message: String,
    },
    /// A part the injector adds could not be turned into a YAML value (a bug, not the input).
    #[error("{object}: cannot encode the {part}: {message}")]
    Internal {
        /// `Kind/name`.
        object: String,
        /// Which part.
        part: &'static str,
        /// The serializer's or parser's message.
        message: String,
    },
    /// The policy given with `--policy` is invalid.
    #[error("{0}")]
    Policy(String),
}

impl InjectError {
    /// The exit code for this error: 65 (EX_DATAERR) for input that is not YAML, 70
    /// (EX_SOFTWARE) for output that could not be written, 64 (EX_USAGE) otherwise.
    pub fn exit_code(&self) -> u8 {
        match self {
            InjectError::Yaml { .. } => 65,
            InjectError::Encode { .. } | InjectError::Internal { .. } => 70,
            InjectError::Invalid { .. } | InjectError::Policy(_) => 64,
        }
    }
}

/// Services reachable on a dedicated local port: `(env var name, host:port)`.
#[derive(Debug, Clone, Default)]
pub struct ServiceEnv(pub Vec<(String, String)>);

impl ServiceEnv {
    /// `<SERVICE>_ADDR=127.0.0.1:<port>` for every service of `policy` with a `listen:` port.
    /// A wildcard listen address becomes loopback: that is where the app reaches it.
    pub fn from_policy(policy: &outrider_config::Policy) -> Self {
        let mut vars = Vec::new();
        for (name, service) in &policy.services {
            if let Some(listen) = service.listen {
                let ip = if listen.ip().is_unspecified() {
                    IpAddr::from([127, 0, 0, 1])
                } else {
                    listen.ip()
                };
                let key: String = name
                    .chars()
                    .map(|c| {
                        if c.is_ascii_alphanumeric() {
                            c.to_ascii_uppercase()
                        } else {
                            '_'
                        }
                    })
                    .collect();
                vars.push((
                    format!("{key}_ADDR"),
                    std::net::SocketAddr::new(ip, listen.port()).to_string(),
                ));
            }
        }
        Self(vars)
    }
}

/// Settings of one injection run, validated.
#[derive(Debug, Clone)]
pub struct Options {
    /// See [`InjectArgs::control`].
    pub control: String,
    /// See [`InjectArgs::workload`].
    pub workload: Option<String>,
    /// See [`InjectArgs::image`].
    pub image: String,
    /// See [`InjectArgs::token_secret`].
    pub token_secret: String,
    /// See [`InjectArgs::legacy`].
    pub legacy: bool,
    /// See [`InjectArgs::capture`].
    pub capture: bool,
    /// See [`InjectArgs::proxy_cpu`].
    pub cpu: String,
    /// See [`InjectArgs::proxy_cpu_limit`].
    pub cpu_limit: String,
    /// See [`InjectArgs::proxy_memory`].
    pub memory: String,
    /// See [`InjectArgs::drain_timeout`].
    pub drain_timeout: String,
    /// Per-service env vars from `--policy`.
    pub services: ServiceEnv,
}

/// One input, injected.
#[derive(Debug, Default)]
pub struct Injected {
    /// The manifests, with the sidecar added.
    pub text: String,
    /// Workloads skipped, or injected in a way worth a second look: one line each, for stderr.
    pub warnings: Vec<String>,
}

/// Runs `outriderctl inject`: exit 0 with the manifests on stdout (warnings on stderr), 64 for
/// bad flags, bad annotations or an invalid policy, 65 for input that is not YAML, 66 for
/// unreadable input, 70 if an injected document cannot be written back.
pub fn main(args: InjectArgs) -> ExitCode {
    let services = match &args.policy {
        None => ServiceEnv::default(),
        Some(path) => {
            let name = path.display().to_string();
            let text = match std::fs::read_to_string(path) {
                Ok(text) => text,
                Err(e) => {
                    eprintln!("outriderctl: cannot read {name}: {e}");
                    return ExitCode::from(66);
                }
            };
            match outrider_config::load(&name, &text) {
                Ok(loaded) => ServiceEnv::from_policy(&loaded.policy),
                Err(error) => {
                    eprint!("{}", crate::diagnose::render(&error, &text));
                    return ExitCode::from(64);
                }
            }
        }
    };
    let options = Options {
        control: args.control,
        workload: args.workload,
        image: args.image,
        token_secret: args.token_secret,
        legacy: args.legacy,
        capture: args.capture,
        cpu: args.proxy_cpu,
        cpu_limit: args.proxy_cpu_limit,
        memory: args.proxy_memory,
        drain_timeout: args.drain_timeout,
        services,
    };
    let mut files = args.files;
    files.extend(args.paths);
    if files.is_empty() {
        files.push(PathBuf::from("-"));
    }
    let mut out = String::new();
    for (i, path) in files.iter().enumerate() {
        let (name, text) = if path.as_os_str() == "-" {
            let mut text = String::new();
            if let Err(e) = std::io::stdin().read_to_string(&mut text) {
                eprintln!("outriderctl: cannot read standard input: {e}");
                return ExitCode::from(66);
            }
            ("<stdin>".to_string(), text)
        } else {
            match std::fs::read_to_string(path) {
                Ok(text) => (path.display().to_string(), text),
                Err(e) => {
                    eprintln!("outriderctl: cannot read {}: {e}", path.display());
                    return ExitCode::from(66);
                }
            }
        };
        match inject_text(&name, &text, &options) {
            Ok(injected) => {
                for warning in &injected.warnings {
                    eprintln!("outriderctl: warning: {warning}");
                }
                if i > 0 && !injected.text.starts_with("---") {
                    out.push_str("---\n");
                }
                out.push_str(&injected.text);
                if !out.ends_with('\n') {
                    out.push('\n');
                }
            }
            Err(e) => {
                eprintln!("outriderctl: {e}");
                return ExitCode::from(e.exit_code());
            }
        }
    }
    print!("{out}");
    ExitCode::SUCCESS
}

/// Injects every workload in the multi-document `text`; `source_name` names it in errors.
pub fn inject_text(
    source_name: &str,
    text: &str,
    options: &Options,
) -> Result<Injected, InjectError> {
    check_quantity("--proxy-cpu", &options.cpu)?;
    check_quantity("--proxy-cpu-limit", &options.cpu_limit)?;
    check_quantity("--proxy-memory", &options.memory)?;
    check_duration("--drain-timeout", &options.drain_timeout)?;
    let mut out = Injected {
        text: String::with_capacity(text.len() * 2),
        warnings: Vec::new(),
    };
    for (index, doc) in split_documents(text).into_iter().enumerate() {
        out.text.push_str(doc.marker);
        let mut value: Value = if doc.body.trim().is_empty() {
            Value::Null
        } else {
            serde_saphyr::from_str(doc.body).map_err(|error| InjectError::Yaml {
                source_name: source_name.to_string(),
                index: index + 1,
                error: Box::new(error),
            })?
        };
        if inject_value(&mut value, options, &mut out.warnings)? {
            let serialized =
                serde_saphyr::to_string(&value).map_err(|error| InjectError::Encode {
                    source_name: source_name.to_string(),
                    index: index + 1,
                    error,
                })?;
            out.text.push_str(&serialized);
        } else {
            out.text.push_str(doc.body);
        }
    }
    Ok(out)
}
