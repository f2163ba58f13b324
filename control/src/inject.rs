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

/// One document: its `---` line (empty for the first one when it has none) and its text.
struct Document<'a> {
    marker: &'a str,
    body: &'a str,
}

/// Splits at lines that start a document (`---` alone or followed by a space or a comment).
/// Concatenating every marker and body gives back `text` exactly.
fn split_documents(text: &str) -> Vec<Document<'_>> {
    let mut docs = Vec::new();
    let mut marker = "";
    let mut body_start = 0;
    let mut pos = 0;
    for line in text.split_inclusive('\n') {
        let content = line.trim_end_matches(['\n', '\r']);
        let is_marker = content == "---"
            || content.strip_prefix("---").is_some_and(|rest| {
                rest.starts_with(' ') || rest.starts_with('\t') || rest.starts_with('#')
            });
        if is_marker {
            if pos > 0 {
                docs.push(Document {
                    marker,
                    body: &text[body_start..pos],
                });
            }
            marker = &text[pos..pos + line.len()];
            body_start = pos + line.len();
        }
        pos += line.len();
    }
    docs.push(Document {
        marker,
        body: &text[body_start..],
    });
    docs
}

/// Injects `value` in place if it is a workload (or a List of them); true if it changed shape
/// and must be re-serialised. Skipped workloads that deserve a word add to `warnings`.
fn inject_value(
    value: &mut Value,
    options: &Options,
    warnings: &mut Vec<String>,
) -> Result<bool, InjectError> {
    let Some(kind) = value
        .get("kind")
        .and_then(Value::as_str)
        .map(str::to_string)
    else {
        return Ok(false);
    };
    if kind == "List" {
        let mut changed = false;
        if let Some(Value::Sequence(items)) = value.get_mut("items") {
            for item in items {
                changed |= inject_value(item, options, warnings)?;
            }
        }
        return Ok(changed);
    }
    let template_path: &[&str] = match kind.as_str() {
        "Pod" => &[],
        "Deployment" | "StatefulSet" | "DaemonSet" | "ReplicaSet" | "Job" => &["spec", "template"],
        "CronJob" => &["spec", "jobTemplate", "spec", "template"],
        _ => return Ok(false),
    };
    let object = format!(
        "{kind}/{}",
        value
            .get("metadata")
            .and_then(|m| m.get("name"))
            .and_then(Value::as_str)
            .unwrap_or("<unnamed>")
    );
    let invalid = |message: String| InjectError::Invalid {
        object: object.clone(),
        message,
    };

    // Annotations on the pod template win over those on the workload object.
    let outer = annotations(value).map_err(invalid)?;
    let template = walk(value, template_path)
        .ok_or_else(|| invalid(format!("no pod template at {}", template_path.join("."))))?;
    let mut notes = outer;
    notes.extend(annotations(template).map_err(invalid)?);
    let note = |key: &str| {
        notes
            .iter()
            .rev()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.clone())
    };
    if note(ANNOTATION_INJECT).as_deref() == Some("false") {
        return Ok(false);
    }
    let pod_spec = template.get("spec");
    if pod_spec.and_then(|spec| spec.get("hostNetwork")) == Some(&Value::Bool(true)) {
        // The pod's network is the node's: the proxy's ports would collide between such pods,
        // and capture rules would redirect the node's own traffic.
        warnings.push(format!(
            "{object}: not injected: hostNetwork pods share the node's network namespace"
        ));
        return Ok(false);
    }
    // Legacy sidecars never exit on their own: a pod meant to finish needs its app to stop them.
    let runs_to_completion = match kind.as_str() {
        "Job" | "CronJob" => true,
        "Pod" => matches!(
            pod_spec
                .and_then(|spec| spec.get("restartPolicy"))
                .and_then(Value::as_str),
            Some("Never" | "OnFailure")
        ),
        _ => false,
    };
    let cpu = note(ANNOTATION_CPU).unwrap_or_else(|| options.cpu.clone());
    let memory = note(ANNOTATION_MEMORY).unwrap_or_else(|| options.memory.clone());
    let drain = note(ANNOTATION_DRAIN).unwrap_or_else(|| options.drain_timeout.clone());
    check_quantity(ANNOTATION_CPU, &cpu).map_err(|e| invalid(e.to_string()))?;
    check_quantity(ANNOTATION_MEMORY, &memory).map_err(|e| invalid(e.to_string()))?;
    let drain_duration =
        check_duration(ANNOTATION_DRAIN, &drain).map_err(|e| invalid(e.to_string()))?;
    let capture = match note(ANNOTATION_CAPTURE).as_deref() {
        None => options.capture,
        Some("true") => true,
        Some("false") => false,
        Some(other) => {
            return Err(invalid(format!(
                "{ANNOTATION_CAPTURE} `{other}` is not \"true\" or \"false\""
            )))
        }
    };
    let skips = Skips {
        inbound_ports: note(ANNOTATION_SKIP_INBOUND_PORTS)
            .map(|v| check_ports(ANNOTATION_SKIP_INBOUND_PORTS, &v, Some(INBOUND_PORT)))
            .transpose()
            .map_err(invalid)?,
        outbound_ports: note(ANNOTATION_SKIP_OUTBOUND_PORTS)
            .map(|v| check_ports(ANNOTATION_SKIP_OUTBOUND_PORTS, &v, None))
            .transpose()
            .map_err(invalid)?,
        outbound_cidrs: note(ANNOTATION_SKIP_OUTBOUND_CIDRS)
            .map(|v| check_cidrs(ANNOTATION_SKIP_OUTBOUND_CIDRS, &v))
            .transpose()
            .map_err(invalid)?,
    };
    if !capture && !skips.is_empty() {
        warnings.push(format!(
            "{object}: the outrider.dev/skip-* annotations have no effect: its traffic is not captured"
        ));
    }
    let workload = note(ANNOTATION_WORKLOAD)
        .or_else(|| options.workload.clone())
        .or_else(|| label(template, "app.kubernetes.io/name"))
        .or_else(|| label(template, "app"))
        .or_else(|| {
            value
                .get("metadata")
                .and_then(|m| m.get("name"))
                .and_then(Value::as_str)
                .map(str::to_string)
        })
        .ok_or_else(|| invalid("no workload name: set --workload".to_string()))?;

    let template = walk_mut(value, template_path)
        .ok_or_else(|| invalid(format!("no pod template at {}", template_path.join("."))))?;
    let sidecar = Sidecar {
        options,
        object: &object,
        workload: &workload,
        cpu: &cpu,
        memory: &memory,
        drain: &drain,
        capture,
        skips,
        runs_to_completion,
    };
    inject_pod(template, &sidecar, drain_duration, warnings).map_err(|e| match e {
        PodError::Shape(message) => invalid(message),
        PodError::Encode { part, message } => InjectError::Internal {
            object: object.clone(),
            part,
            message,
        },
    })?;
    Ok(true)
}

/// `metadata.annotations` of `value` as pairs.
/// One of ours that is not a string (`outrider.dev/capture: false`, unquoted) is refused: the
/// API server would refuse it too, and ignoring it here would do the opposite of what it says.
fn annotations(value: &Value) -> Result<Vec<(String, String)>, String> {
    let Some(Value::Mapping(map)) = value.get("metadata").and_then(|m| m.get("annotations")) else {
        return Ok(Vec::new());
    };
    let mut pairs = Vec::with_capacity(map.len());
    for (key, v) in map.iter() {
        let Some(key) = key.as_str() else { continue };
        match v.as_str() {
            Some(v) => pairs.push((key.to_string(), v.to_string())),
            None if key.starts_with("outrider.dev/") => {
                let shown = serde_saphyr::to_string(v).unwrap_or_default();
                return Err(format!(
                    "annotation {key} must be a string: quote it ({key}: \"{}\")",
                    shown.trim()
                ));
            }
            None => {}
        }
    }
    Ok(pairs)
}

fn label(value: &Value, key: &str) -> Option<String> {
    value
        .get("metadata")?
        .get("labels")?
        .get(key)?
        .as_str()
        .map(str::to_string)
}

fn walk<'a>(mut value: &'a Value, path: &[&str]) -> Option<&'a Value> {
    for key in path {
        value = value.get(key)?;
    }
    Some(value)
}

fn walk_mut<'a>(mut value: &'a mut Value, path: &[&str]) -> Option<&'a mut Value> {
    for key in path {
        value = value.get_mut(key)?;
    }
    Some(value)
}

/// What varies per workload.
struct Sidecar<'a> {
    options: &'a Options,
    /// `Kind/name`, for warnings.
    object: &'a str,
    workload: &'a str,
    cpu: &'a str,
    memory: &'a str,
    drain: &'a str,
    /// Traffic captured by the init container, else explicit (`HTTP_PROXY`).
    capture: bool,
    skips: Skips,
    /// A Job, a CronJob, or a Pod whose restartPolicy is Never or OnFailure.
    runs_to_completion: bool,
}

/// The capture exceptions from the skip annotations, checked, as `outrider-proxy init` flags.
#[derive(Debug, Default)]
struct Skips {
    inbound_ports: Option<String>,
    outbound_ports: Option<String>,
    outbound_cidrs: Option<String>,
}

impl Skips {
    fn is_empty(&self) -> bool {
        self.inbound_ports.is_none()
            && self.outbound_ports.is_none()
            && self.outbound_cidrs.is_none()
    }
}

/// Why a pod could not be injected.
enum PodError {
    /// The pod has a shape the injector cannot edit.
    Shape(String),
    /// A typed part could not be turned into a value.
    Encode { part: &'static str, message: String },
}

impl From<String> for PodError {
    fn from(message: String) -> Self {
        PodError::Shape(message)
    }
}

impl From<&str> for PodError {
    fn from(message: &str) -> Self {
        PodError::Shape(message.to_string())
    }
}

/// Adds the sidecar (and with capture the init container) to a pod or pod template
/// `{metadata, spec}`.
fn inject_pod(
    pod: &mut Value,
    sidecar: &Sidecar<'_>,
    drain: std::time::Duration,
    warnings: &mut Vec<String>,
) -> Result<(), PodError> {
    let legacy = sidecar.options.legacy;
    let pod = pod
        .as_mapping_mut()
        .ok_or("the pod template is not a mapping")?;
    if !pod.contains_key("metadata") {
        insert_before(pod, "spec", "metadata", Value::Mapping(Mapping::new()));
    }

    let spec = entry_map(pod, "spec")?;
    // What an earlier injection did to the app's probes, before its sidecar goes.
    let earlier_probes = earlier_app_probes(spec)?;
    // Remove an earlier injection wherever it was (native or legacy), then add ours.
    for list in ["initContainers", "containers"] {
        if let Some(Value::Sequence(containers)) = spec.get_mut(list) {
            containers.retain(|c| {
                !matches!(
                    c.get("name").and_then(Value::as_str),
                    Some(SIDECAR_NAME | INIT_NAME)
                )
            });
        }
    }
    if let Some(Value::Sequence(init)) = spec.get("initContainers") {
        if init.is_empty() {
            spec.shift_remove("initContainers");
        }
        // Plain init containers run before a legacy sidecar exists: with capture, their TCP is
        // redirected to a port nobody listens on yet.
        else if sidecar.capture && legacy {
            warnings.push(format!(
                "{}: its init containers run before the legacy sidecar starts, so their outbound \
                 TCP is captured with no proxy to take it (connection refused): exempt their \
                 destinations with {ANNOTATION_SKIP_OUTBOUND_PORTS} or \
                 {ANNOTATION_SKIP_OUTBOUND_CIDRS}, or run them as uid {PROXY_UID}",
                sidecar.object
            ));
        }
    }
    let mut probes = ProbeRecords::new();
    // The app's native sidecars (init containers with `restartPolicy: Always`) are probed like
    // its containers (plain init containers may have no probes). Ours were removed above.
    if let Some(Value::Sequence(init)) = spec.get_mut("initContainers") {
        for container in init.iter_mut().filter(|c| is_native_sidecar(c)) {
            let container = container
                .as_mapping_mut()
                .ok_or("an init container is not a mapping")?;
            rewrite_probes(container, sidecar, &earlier_probes, &mut probes)?;
        }
    }
    let containers = match spec.get_mut("containers") {
        Some(Value::Sequence(c)) if !c.is_empty() => c,
        _ => return Err("spec.containers is empty".into()),
    };
    let default_container = containers[0]
        .get("name")
        .and_then(Value::as_str)
        .ok_or("spec.containers[0] has no name")?
        .to_string();
    for container in containers.iter_mut() {
        let container = container
            .as_mapping_mut()
            .ok_or("a container is not a mapping")?;
        let who = format!(
            "{} container {}",
            sidecar.object,
            container
                .get("name")
                .and_then(Value::as_str)
                .unwrap_or("<unnamed>")
        );
        edit_app_env(container, sidecar, &who, warnings)?;
        rewrite_probes(container, sidecar, &earlier_probes, &mut probes)?;
    }

    // First in line: the init container installs the rules before anything else runs; a
    // native sidecar is started (and must pass its startup probe) before the next init
    // container; a legacy one's postStart hook holds the app containers back.
    let app_probes = (!probes.is_empty())
        .then(|| serde_json::to_string(&probes))
        .transpose()
        .map_err(|e| PodError::Encode {
            part: "app probes",
            message: e.to_string(),
        })?;
    let proxy = to_value(
        &sidecar_container(sidecar, app_probes.as_deref()),
        "sidecar container",
    )?;
    let mut first = Vec::new();
    if sidecar.capture {
        first.push(to_value(&init_container(sidecar), "init container")?);
    }
    if legacy {
        containers.insert(0, proxy);
    } else {
        first.push(proxy);
    }
    if !first.is_empty() {
        if !spec.contains_key("initContainers") {
            // Where a person would write it: just before `containers`.
            insert_before(
                spec,
                "containers",
                "initContainers",
                Value::Sequence(Vec::new()),
            );
        }
        let init = entry_seq(spec, "initContainers")?;
        init.splice(0..0, first);
    }

    let ours = [TOKEN_VOLUME, STATE_VOLUME, IDENTITY_VOLUME, INIT_RUN_VOLUME];
    let volumes = entry_seq(spec, "volumes")?;
    volumes.retain(|v| {
        !v.get("name")
            .and_then(Value::as_str)
            .is_some_and(|name| ours.contains(&name))
    });
    for volume in sidecar_volumes(sidecar) {
        volumes.push(to_value(&volume, "volumes")?);
    }

    // The kubelet kills the pod when the grace period ends: leave the drain room to finish.
    let needed = drain.as_secs() + u64::from(drain.subsec_nanos() > 0) + GRACE_MARGIN_SECS;
    let current = spec
        .get("terminationGracePeriodSeconds")
        .and_then(Value::as_u64)
        .unwrap_or(30);
    if current < needed {
        set(spec, "terminationGracePeriodSeconds", Value::from(needed));
    }

    let metadata = entry_map(pod, "metadata")?;
    set(entry_map(metadata, "labels")?, LABEL_MESHED, s("true"));
    let annotations = entry_map(metadata, "annotations")?;
    set(annotations, "prometheus.io/scrape", s("true"));
    set(
        annotations,
        "prometheus.io/port",
        s(&ADMIN_PORT.to_string()),
    );
    set(annotations, "prometheus.io/path", s("/metrics"));
    // A choice of the app's own wins, unless it names one of ours.
    let chosen = annotations
        .get(ANNOTATION_DEFAULT_CONTAINER)
        .and_then(Value::as_str);
    if chosen.is_none_or(|name| name == SIDECAR_NAME || name == INIT_NAME) {
        set(
            annotations,
            ANNOTATION_DEFAULT_CONTAINER,
            s(&default_container),
        );
    }
    set(annotations, ANNOTATION_INJECTED_VERSION, s(VERSION));
    set(
        annotations,
        ANNOTATION_INJECTED_SIDECAR,
        s(if legacy { "legacy" } else { "native" }),
    );
    set(
        annotations,
        ANNOTATION_INJECTED_TRAFFIC,
        s(if sidecar.capture {
            "capture"
        } else {
            "explicit"
        }),
    );
    Ok(())
}

/// Sets what an app container is told. Explicit mode: `HTTP_PROXY` (unless the app names a
/// proxy of its own) and `NO_PROXY` merged with the app's. Capture: neither, and what an
/// earlier explicit injection set is taken back. Either way `<SERVICE>_ADDR` for the dedicated
/// ports, and for a legacy run-to-completion pod where to stop the sidecar.
fn edit_app_env(
    container: &mut Mapping,
    sidecar: &Sidecar<'_>,
    who: &str,
    warnings: &mut Vec<String>,
) -> Result<(), String> {
    let list = entry_seq(container, "env")?;
    if sidecar.capture {
        let our_no_proxy = NO_PROXY_ENTRIES.join(",");
        list.retain(|e| match (env_name(e), env_value(e)) {
            (Some("HTTP_PROXY" | "http_proxy"), Some(v)) => v != PROXY_URL,
            (Some("NO_PROXY" | "no_proxy"), Some(v)) => v != our_no_proxy,
            _ => true,
        });
    } else {
        set_proxy_env(list, who, warnings);
    }
    for (name, value) in &sidecar.options.services.0 {
        set_env(list, name, value);
    }
    let shutdown_url = format!("http://127.0.0.1:{ADMIN_PORT}/shutdown");
    if sidecar.options.legacy && sidecar.runs_to_completion {
        set_env(list, SHUTDOWN_URL_ENV, &shutdown_url);
    } else {
        list.retain(|e| {
            env_name(e) != Some(SHUTDOWN_URL_ENV) || env_value(e) != Some(&shutdown_url)
        });
    }
    if list.is_empty() {
        container.shift_remove("env");
    }
    Ok(())
}

/// The explicit mode's `HTTP_PROXY` and `NO_PROXY`, merged into what the app sets itself.
fn set_proxy_env(list: &mut Vec<Value>, who: &str, warnings: &mut Vec<String>) {
    // A proxy of the app's own, in either spelling, is kept, and both spellings are then left
    // as the app set them: a client reading the other one must not be sent to us instead.
    let own = list.iter().find_map(|e| match env_name(e) {
        Some(name @ ("HTTP_PROXY" | "http_proxy")) if env_value(e) != Some(PROXY_URL) => {
            Some((name, env_value(e).unwrap_or("(valueFrom)")))
        }
        _ => None,
    });
    match own {
        Some((name, value)) => warnings.push(format!(
            "{who} keeps its own {name}={value}: its plain-HTTP calls go there, not through \
             the mesh (capture, the default, meshes them)"
        )),
        None => {
            set_env(list, "HTTP_PROXY", PROXY_URL);
            // Both spellings: curl and many Go/Python clients read only the lowercase one.
            set_env(list, "http_proxy", PROXY_URL);
        }
    }
    // NO_PROXY: the app's entries (either spelling) first, then ours that are missing.
    let mut entries: Vec<String> = Vec::new();
    for name in ["NO_PROXY", "no_proxy"] {
        let value = list
            .iter()
            .find(|e| env_name(e) == Some(name))
            .and_then(env_value);
        for item in value.unwrap_or_default().split(',').map(str::trim) {
            if !item.is_empty() && !entries.iter().any(|e| e == item) {
                entries.push(item.to_string());
            }
        }
    }
    for ours in NO_PROXY_ENTRIES {
        if !entries.iter().any(|e| e == ours) {
            entries.push(ours.to_string());
        }
    }
    let merged = entries.join(",");
    for name in ["NO_PROXY", "no_proxy"] {
        let from_elsewhere = list
            .iter()
            .any(|e| env_name(e) == Some(name) && env_value(e).is_none());
        if from_elsewhere {
            warnings.push(format!(
                "{who}: {name} comes from valueFrom, so it is left as it is: add {} to it",
                NO_PROXY_ENTRIES.join(",")
            ));
        } else {
            set_env(list, name, &merged);
        }
    }
}

fn env_name(entry: &Value) -> Option<&str> {
    entry.get("name").and_then(Value::as_str)
}

/// An env entry's literal value (empty if it has none); `None` when it comes from `valueFrom`.
fn env_value(entry: &Value) -> Option<&str> {
    if entry.get("valueFrom").is_some() {
        return None;
    }
    match entry.get("value") {
        None | Some(Value::Null) => Some(""),
        Some(value) => value.as_str(),
    }
}

/// Sets env var `name` in `list`, replacing an existing entry in place.
fn set_env(list: &mut Vec<Value>, name: &str, value: &str) {
    let mut entry = Mapping::with_capacity(2);
    entry.insert(s("name"), s(name));
    entry.insert(s("value"), s(value));
    let entry = Value::Mapping(entry);
    match list.iter_mut().find(|e| env_name(e) == Some(name)) {
        Some(existing) => *existing = entry,
        None => list.push(entry),
    }
}

/// The probe fields of a container and the kind each is called in `/app-health/`.
const PROBE_KINDS: [(&str, &str); 3] = [
    ("livenessProbe", "liveness"),
    ("readinessProbe", "readiness"),
    ("startupProbe", "startup"),
];

/// The handlers a probe may have; the first three are the ones that connect to a port.
const PROBE_HANDLERS: [&str; 4] = ["httpGet", "tcpSocket", "grpc", "exec"];

/// The probes an earlier injection rewrote, from its proxy container's `OUTRIDER_APP_PROBES`.
fn earlier_app_probes(spec: &Mapping) -> Result<ProbeRecords, String> {
    let proxies = ["initContainers", "containers"]
        .into_iter()
        .filter_map(|list| spec.get(list).and_then(Value::as_sequence))
        .flatten()
        .filter(|c| c.get("name").and_then(Value::as_str) == Some(SIDECAR_NAME));
    for proxy in proxies {
        let Some(env) = proxy.get("env").and_then(Value::as_sequence) else {
            continue;
        };
        if let Some(json) = env
            .iter()
            .find(|e| env_name(e) == Some(APP_PROBES_ENV))
            .and_then(env_value)
        {
            return serde_json::from_str(json).map_err(|e| {
                format!("the {SIDECAR_NAME} container's {APP_PROBES_ENV} is not what inject writes: {e}")
            });
        }
    }
    Ok(ProbeRecords::new())
}

/// An app container's (or native sidecar's) probes: each one an earlier injection pointed at
/// the admin port is first given back its handler from `earlier`; then, with capture, each
/// `httpGet`, `tcpSocket` and `grpc` probe on a captured port is pointed at the admin port's
/// `/app-health/<container>/<kind>` (its timings unchanged) and recorded in `records`.
fn rewrite_probes(
    container: &mut Mapping,
    sidecar: &Sidecar<'_>,
    earlier: &ProbeRecords,
    records: &mut ProbeRecords,
) -> Result<(), String> {
    let name = container
        .get("name")
        .and_then(Value::as_str)
        .unwrap_or("<unnamed>")
        .to_string();
    let ports = container.get("ports").cloned();
    for (field, kind) in PROBE_KINDS {
        let key = format!("{name}/{kind}");
        let what = format!("container {name} {field}");
        let Some(probe) = container.get_mut(field).and_then(Value::as_mapping_mut) else {
            continue;
        };
        if is_rewritten(probe, &key) {
            let record = earlier.get(&key).ok_or_else(|| {
                format!(
                    "{what} points at {APP_HEALTH_PREFIX}{key} but the {SIDECAR_NAME} container \
                     has no record of the original probe: restore it by hand"
                )
            })?;
            let (handler, value) = match (&record.http_get, &record.tcp_socket, &record.grpc) {
                (Some(get), _, _) => ("httpGet", to_value(get, "probe").map_err(encode_msg)?),
                (_, Some(tcp), _) => ("tcpSocket", to_value(tcp, "probe").map_err(encode_msg)?),
                (_, _, Some(grpc)) => ("grpc", to_value(grpc, "probe").map_err(encode_msg)?),
                _ => return Err(format!("{what}: the recorded probe has no handler")),
            };
            replace_handler(probe, handler, value);
        }
        if !sidecar.capture {
            continue;
        }
        let Some(record) = probe_record(probe, ports.as_ref(), &what)? else {
            continue;
        };
        let port = record.port();
        let skipped =
            port == ADMIN_PORT || in_port_list(sidecar.skips.inbound_ports.as_deref(), port);
        if skipped {
            // Not captured: the kubelet reaches the app as it always did.
            continue;
        }
        let mut target = Mapping::with_capacity(2);
        target.insert(s("path"), s(&format!("{APP_HEALTH_PREFIX}{key}")));
        target.insert(s("port"), Value::from(u64::from(ADMIN_PORT)));
        replace_handler(probe, "httpGet", Value::Mapping(target));
        records.insert(key, record);
    }
    Ok(())
}

fn encode_msg(e: PodError) -> String {
    match e {
        PodError::Shape(message) | PodError::Encode { message, .. } => message,
    }
}

/// Whether an init container is a native sidecar: started before the app and kept running.
fn is_native_sidecar(container: &Value) -> bool {
    container.get("restartPolicy").and_then(Value::as_str) == Some("Always")
}

/// Whether `probe` is this injector's rewrite of probe `key`.
fn is_rewritten(probe: &Mapping, key: &str) -> bool {
    let Some(get) = probe.get("httpGet") else {
        return false;
    };
    get.get("port").and_then(Value::as_u64) == Some(u64::from(ADMIN_PORT))
        && get
            .get("path")
            .and_then(Value::as_str)
            .and_then(|p| p.strip_prefix(APP_HEALTH_PREFIX))
            == Some(key)
}

/// Puts `handler: value` where the probe's handler was (keeping the probe's key order), and
/// drops any other handler.
fn replace_handler(probe: &mut Mapping, handler: &str, value: Value) {
    let mut out = Mapping::with_capacity(probe.len());
    let mut placed = false;
    for (k, v) in std::mem::take(probe) {
        if k.as_str().is_some_and(|k| PROBE_HANDLERS.contains(&k)) {
            if !placed {
                out.insert(s(handler), value.clone());
                placed = true;
            }
            continue;
        }
        out.insert(k, v);
    }
    if !placed {
        out.insert(s(handler), value);
    }
    *probe = out;
}

/// What the proxy needs to perform `probe`, or `None` for a probe that does not reach the
/// pod's ports through the capture (`exec`, or an `httpGet`/`tcpSocket` with a `host` of its
/// own). Named ports are resolved against the container's `ports`.
fn probe_record(
    probe: &Mapping,
    ports: Option<&Value>,
    what: &str,
) -> Result<Option<ProbeRecord>, String> {
    let timeout_seconds = match probe.get("timeoutSeconds") {
        None | Some(Value::Null) => 1,
        Some(v) => v
            .as_u64()
            .and_then(|t| u32::try_from(t).ok())
            .filter(|t| (1..=MAX_PROBE_TIMEOUT_SECONDS).contains(t))
            .ok_or_else(|| {
                format!("{what}: timeoutSeconds is not 1-{MAX_PROBE_TIMEOUT_SECONDS}")
            })?,
    };
    let has_host = |handler: &Value| {
        handler
            .get("host")
            .is_some_and(|h| h.as_str().is_some_and(|h| !h.is_empty()))
    };
    let mut record = ProbeRecord {
        http_get: None,
        tcp_socket: None,
        grpc: None,
        timeout_seconds,
    };
    if let Some(get) = probe.get("httpGet") {
        if has_host(get) {
            return Ok(None);
        }
        let optional = |key: &str| get.get(key).and_then(Value::as_str).map(str::to_string);
        let mut http_headers = Vec::new();
        for header in get
            .get("httpHeaders")
            .and_then(Value::as_sequence)
            .into_iter()
            .flatten()
        {
            match (
                header.get("name").and_then(Value::as_str),
                header.get("value").and_then(Value::as_str),
            ) {
                (Some(name), Some(value)) => http_headers.push(HeaderRecord {
                    name: name.to_string(),
                    value: value.to_string(),
                }),
                _ => {
                    return Err(format!(
                        "{what}: an httpHeaders entry is not {{name, value}}"
                    ))
                }
            }
        }
        let scheme = optional("scheme");
        if !matches!(scheme.as_deref(), None | Some("HTTP" | "HTTPS")) {
            return Err(format!("{what}: scheme is not HTTP or HTTPS"));
        }
        record.http_get = Some(HttpGetRecord {
            path: optional("path"),
            port: resolve_port(get.get("port"), ports, what)?,
            scheme,
            http_headers,
        });
    } else if let Some(tcp) = probe.get("tcpSocket") {
        if has_host(tcp) {
            return Ok(None);
        }
        record.tcp_socket = Some(PortRecord {
            port: resolve_port(tcp.get("port"), ports, what)?,
        });
    } else if let Some(grpc) = probe.get("grpc") {
        // The kubelet's gRPC probe takes a number only.
        let port = grpc
            .get("port")
            .and_then(Value::as_u64)
            .and_then(|p| u16::try_from(p).ok())
            .filter(|p| *p > 0)
            .ok_or_else(|| format!("{what}: grpc.port is not a port number"))?;
        record.grpc = Some(GrpcRecord {
            port,
            service: grpc
                .get("service")
                .and_then(Value::as_str)
                .map(str::to_string),
        });
    } else {
        return Ok(None);
    }
    Ok(Some(record))
}

/// A probe's port: a number, or the name of one of the container's `ports`.
fn resolve_port(port: Option<&Value>, ports: Option<&Value>, what: &str) -> Result<u16, String> {
    match port {
        Some(Value::String(name)) => ports
            .and_then(Value::as_sequence)
            .into_iter()
            .flatten()
            .find(|p| p.get("name").and_then(Value::as_str) == Some(name))
            .and_then(|p| p.get("containerPort").and_then(Value::as_u64))
            .and_then(|p| u16::try_from(p).ok())
            .filter(|p| *p > 0)
            .ok_or_else(|| {
                format!("{what}: port `{name}` is not the name of one of the container's ports")
            }),
        Some(v) => v
            .as_u64()
            .and_then(|p| u16::try_from(p).ok())
            .filter(|p| *p > 0)
            .ok_or_else(|| format!("{what}: port is not 1-65535 or a port name")),
        None => Err(format!("{what}: no port")),
    }
}

/// Whether `port` is in a checked port list (`22,9000-9100`).
fn in_port_list(list: Option<&str>, port: u16) -> bool {
    list.into_iter().flat_map(|l| l.split(',')).any(|entry| {
        let (first, last) = entry.split_once('-').unwrap_or((entry, entry));
        matches!(
            (first.parse::<u16>(), last.parse::<u16>()),
            (Ok(first), Ok(last)) if (first..=last).contains(&port)
        )
    })
}

/// A container as the Kubernetes API reads it: the fields the injector writes, in the order a
/// person would write them.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct Container {
    name: &'static str,
    image: String,
    /// `Always` makes an init container a native sidecar.
    #[serde(skip_serializing_if = "Option::is_none")]
    restart_policy: Option<&'static str>,
    command: Vec<String>,
    args: Vec<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    env: Vec<EnvVar>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    ports: Vec<ContainerPort>,
    #[serde(skip_serializing_if = "Option::is_none")]
    startup_probe: Option<Probe>,
    #[serde(skip_serializing_if = "Option::is_none")]
    liveness_probe: Option<Probe>,
    #[serde(skip_serializing_if = "Option::is_none")]
    readiness_probe: Option<Probe>,
    #[serde(skip_serializing_if = "Option::is_none")]
    lifecycle: Option<Lifecycle>,
    resources: Resources,
    security_context: SecurityContext,
    volume_mounts: Vec<VolumeMount>,
}

/// An env var: a literal value, or one from the downward API (`valueFrom.fieldRef`).
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct EnvVar {
    name: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    value: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    value_from: Option<FieldSource>,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct FieldSource {
    field_ref: FieldRef,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct FieldRef {
    field_path: &'static str,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct ContainerPort {
    name: &'static str,
    container_port: u16,
    protocol: &'static str,
}

/// An HTTP GET probe on the admin port.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct Probe {
    http_get: HttpGet,
    period_seconds: u32,
    failure_threshold: u32,
}

#[derive(Debug, Serialize)]
struct HttpGet {
    path: &'static str,
    port: &'static str,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct Lifecycle {
    post_start: Exec,
}

#[derive(Debug, Serialize)]
struct Exec {
    exec: Command,
}

#[derive(Debug, Serialize)]
struct Command {
    command: Vec<String>,
}

#[derive(Debug, Serialize)]
struct Resources {
    requests: Quantities,
    limits: Quantities,
}

#[derive(Debug, Serialize)]
struct Quantities {
    cpu: String,
    memory: String,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct SecurityContext {
    run_as_non_root: bool,
    run_as_user: u32,
    run_as_group: u32,
    read_only_root_filesystem: bool,
    allow_privilege_escalation: bool,
    capabilities: Capabilities,
    seccomp_profile: SeccompProfile,
}

/// Dropped first, then added (the order the kernel's bounding set is built in).
#[derive(Debug, Serialize)]
struct Capabilities {
    drop: Vec<&'static str>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    add: Vec<&'static str>,
}

#[derive(Debug, Serialize)]
struct SeccompProfile {
    #[serde(rename = "type")]
    kind: &'static str,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct VolumeMount {
    name: &'static str,
    mount_path: &'static str,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    read_only: bool,
}

/// A pod volume: exactly one of the sources is set.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct Volume {
    name: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    secret: Option<SecretSource>,
    #[serde(skip_serializing_if = "Option::is_none")]
    empty_dir: Option<EmptyDir>,
    #[serde(skip_serializing_if = "Option::is_none")]
    projected: Option<Projected>,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct SecretSource {
    secret_name: String,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct EmptyDir {
    size_limit: &'static str,
}

#[derive(Debug, Serialize)]
struct Projected {
    sources: Vec<ProjectedSource>,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct ProjectedSource {
    service_account_token: ServiceAccountToken,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct ServiceAccountToken {
    audience: &'static str,
    expiration_seconds: u64,
    path: &'static str,
}

/// A typed part as the ordered value the pod is edited in. Through text: serde has no
/// in-memory transcoder, and one more small document costs nothing next to the manifest.
fn to_value<T: Serialize>(part: &T, name: &'static str) -> Result<Value, PodError> {
    let encode = |message: String| PodError::Encode {
        part: name,
        message,
    };
    let text = serde_saphyr::to_string(part).map_err(|e| encode(e.to_string()))?;
    serde_saphyr::from_str(&text).map_err(|e| encode(e.to_string()))
}

fn strings<const N: usize>(items: [&str; N]) -> Vec<String> {
    items.into_iter().map(str::to_string).collect()
}

/// The proxy container; `app_probes` is the JSON of the app's probes it performs, if any.
fn sidecar_container(sidecar: &Sidecar<'_>, app_probes: Option<&str>) -> Container {
    let options = sidecar.options;
    let mut args = strings([
        "--workload",
        sidecar.workload,
        "--control",
        &options.control,
        "--token-file",
        &format!("{TOKEN_DIR}/token"),
        "--proxy-id",
        "$(POD_NAME)",
        "--namespace",
        "$(POD_NAMESPACE)",
        "--service-account",
        "$(POD_SERVICE_ACCOUNT)",
        "--identity-token-file",
        &format!("{IDENTITY_DIR}/token"),
        "--state-dir",
        STATE_DIR,
        "--admin",
        &format!("0.0.0.0:{ADMIN_PORT}"),
        "--drain-timeout",
        sidecar.drain,
    ]);
    let legacy = options.legacy;
    if legacy && sidecar.runs_to_completion {
        // Nothing else stops a legacy sidecar when the app is done: the app POSTs here
        // (OUTRIDER_SHUTDOWN_URL), loopback only.
        args.push("--shutdown-endpoint".to_string());
    }
    let probe = |path, period_seconds, failure_threshold| Probe {
        http_get: HttpGet {
            path,
            port: "admin",
        },
        period_seconds,
        failure_threshold,
    };
    let field = |name, field_path| EnvVar {
        name,
        value: None,
        value_from: Some(FieldSource {
            field_ref: FieldRef { field_path },
        }),
    };
    let port = |name, container_port| ContainerPort {
        name,
        container_port,
        protocol: "TCP",
    };
    let mut env = vec![
        field("POD_NAME", "metadata.name"),
        field("POD_NAMESPACE", "metadata.namespace"),
        field("POD_SERVICE_ACCOUNT", "spec.serviceAccountName"),
    ];
    if let Some(probes) = app_probes {
        // The probes connect to the pod's own address, where the kubelet sent them.
        env.push(field(POD_IP_ENV, "status.podIP"));
        env.push(EnvVar {
            name: APP_PROBES_ENV,
            value: Some(probes.to_string()),
            value_from: None,
        });
    }
    Container {
        name: SIDECAR_NAME,
        image: options.image.clone(),
        restart_policy: (!legacy).then_some("Always"),
        command: vec![format!("{BIN_DIR}/outrider-proxy")],
        args,
        env,
        ports: vec![port("admin", ADMIN_PORT), port("inbound", INBOUND_PORT)],
        startup_probe: Some(probe("/ready", 1, 120)),
        liveness_probe: Some(probe("/live", 10, 3)),
        readiness_probe: Some(probe("/ready", 2, 1)),
        // No shell in the image: outriderctl (same image) polls /ready; the kubelet starts the
        // next container only once this hook returns.
        lifecycle: legacy.then(|| Lifecycle {
            post_start: Exec {
                exec: Command {
                    command: strings([
                        &format!("{BIN_DIR}/outriderctl"),
                        "wait-ready",
                        "--admin",
                        &format!("127.0.0.1:{ADMIN_PORT}"),
                        "--timeout",
                        "120s",
                    ]),
                },
            },
        }),
        resources: Resources {
            requests: Quantities {
                cpu: sidecar.cpu.to_string(),
                memory: sidecar.memory.to_string(),
            },
            limits: Quantities {
                cpu: options.cpu_limit.clone(),
                memory: sidecar.memory.to_string(),
            },
        },
        security_context: SecurityContext {
            run_as_non_root: true,
            run_as_user: PROXY_UID,
            run_as_group: PROXY_UID,
            read_only_root_filesystem: true,
            allow_privilege_escalation: false,
            capabilities: Capabilities {
                drop: vec!["ALL"],
                add: Vec::new(),
            },
            seccomp_profile: SeccompProfile {
                kind: "RuntimeDefault",
            },
        },
        volume_mounts: vec![
            VolumeMount {
                name: TOKEN_VOLUME,
                mount_path: TOKEN_DIR,
                read_only: true,
            },
            VolumeMount {
                name: STATE_VOLUME,
                mount_path: STATE_DIR,
                read_only: false,
            },
            VolumeMount {
                name: IDENTITY_VOLUME,
                mount_path: IDENTITY_DIR,
                read_only: true,
            },
        ],
    }
}

/// The init container that installs the capture rules: root, because netfilter wants
/// NET_ADMIN and NET_RAW in the pod's network namespace, and nothing more.
fn init_container(sidecar: &Sidecar<'_>) -> Container {
    let mut args = strings([
        "init",
        "--inbound-port",
        &INBOUND_PORT.to_string(),
        "--outbound-port",
        &OUTBOUND_PORT.to_string(),
        "--admin-port",
        &ADMIN_PORT.to_string(),
        "--proxy-uid",
        &PROXY_UID.to_string(),
    ]);
    let skips = &sidecar.skips;
    for (flag, list) in [
        ("--skip-inbound-ports", &skips.inbound_ports),
        ("--skip-outbound-ports", &skips.outbound_ports),
        ("--skip-outbound-cidrs", &skips.outbound_cidrs),
    ] {
        if let Some(list) = list {
            args.push(flag.to_string());
            args.push(list.clone());
        }
    }
    Container {
        name: INIT_NAME,
        image: sidecar.options.image.clone(),
        restart_policy: None,
        command: vec![format!("{BIN_DIR}/outrider-proxy")],
        args,
        env: Vec::new(),
        ports: Vec::new(),
        startup_probe: None,
        liveness_probe: None,
        readiness_probe: None,
        lifecycle: None,
        // A netfilter transaction of a few dozen rules: milliseconds, a few MB.
        resources: Resources {
            requests: Quantities {
                cpu: "10m".to_string(),
                memory: "20Mi".to_string(),
            },
            limits: Quantities {
                cpu: "100m".to_string(),
                memory: "50Mi".to_string(),
            },
        },
        security_context: SecurityContext {
            run_as_non_root: false,
            run_as_user: 0,
            run_as_group: 0,
            read_only_root_filesystem: true,
            allow_privilege_escalation: false,
            capabilities: Capabilities {
                drop: vec!["ALL"],
                add: vec!["NET_ADMIN", "NET_RAW"],
            },
            seccomp_profile: SeccompProfile {
                kind: "RuntimeDefault",
            },
        },
        volume_mounts: vec![VolumeMount {
            name: INIT_RUN_VOLUME,
            mount_path: INIT_RUN_DIR,
            read_only: false,
        }],
    }
}

/// The pod volumes the injected containers mount.
fn sidecar_volumes(sidecar: &Sidecar<'_>) -> Vec<Volume> {
    let volume = |name| Volume {
        name,
        secret: None,
        empty_dir: None,
        projected: None,
    };
    let mut volumes = vec![
        Volume {
            secret: Some(SecretSource {
                secret_name: sidecar.options.token_secret.clone(),
            }),
            ..volume(TOKEN_VOLUME)
        },
        Volume {
            empty_dir: Some(EmptyDir { size_limit: "16Mi" }),
            ..volume(STATE_VOLUME)
        },
        Volume {
            projected: Some(Projected {
                sources: vec![ProjectedSource {
                    service_account_token: ServiceAccountToken {
                        audience: IDENTITY_AUDIENCE,
                        expiration_seconds: IDENTITY_TOKEN_SECS,
                        path: "token",
                    },
                }],
            }),
            ..volume(IDENTITY_VOLUME)
        },
    ];
    if sidecar.capture {
        volumes.push(Volume {
            empty_dir: Some(EmptyDir { size_limit: "1Mi" }),
            ..volume(INIT_RUN_VOLUME)
        });
    }
    volumes
}

fn s(text: &str) -> Value {
    Value::String(text.to_string())
}

/// Inserts `key: v` right before `before`.
fn insert_before(m: &mut Mapping, before: &str, key: &str, v: Value) {
    let mut out = Mapping::with_capacity(m.len() + 1);
    for (k, old) in std::mem::take(m) {
        if k.as_str() == Some(before) {
            out.insert(s(key), v.clone());
        }
        out.insert(k, old);
    }
    if !out.contains_key(key) {
        out.insert(s(key), v);
    }
    *m = out;
}

fn set(m: &mut Mapping, key: &str, v: Value) {
    m.insert(s(key), v);
}

fn entry_map<'a>(m: &'a mut Mapping, key: &str) -> Result<&'a mut Mapping, String> {
    let slot = m.entry_or_insert_with(key, || Value::Mapping(Mapping::new()));
    if slot.is_null() {
        *slot = Value::Mapping(Mapping::new());
    }
    slot.as_mapping_mut()
        .ok_or_else(|| format!("`{key}` is not a mapping"))
}

fn entry_seq<'a>(m: &'a mut Mapping, key: &str) -> Result<&'a mut Vec<Value>, String> {
    let slot = m.entry_or_insert_with(key, || Value::Sequence(Vec::new()));
    if slot.is_null() {
        *slot = Value::Sequence(Vec::new());
    }
    slot.as_sequence_mut()
        .ok_or_else(|| format!("`{key}` is not a list"))
}

/// A value that is not a Kubernetes quantity (`100m`, `0.5`, `128Mi`, `1G`).
#[derive(Debug)]
struct BadValue {
    what: &'static str,
    value: String,
    expected: &'static str,
}

impl fmt::Display for BadValue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} `{}` is not {}", self.what, self.value, self.expected)
    }
}

impl From<BadValue> for InjectError {
    fn from(e: BadValue) -> Self {
        InjectError::Invalid {
            object: "flags".to_string(),
            message: e.to_string(),
        }
    }
}

fn check_quantity(what: &'static str, value: &str) -> Result<(), BadValue> {
    const SUFFIXES: [&str; 14] = [
        "", "m", "k", "M", "G", "T", "P", "E", "Ki", "Mi", "Gi", "Ti", "Pi", "Ei",
    ];
    let digits = value
        .bytes()
        .take_while(|b| b.is_ascii_digit() || *b == b'.')
        .count();
    let (number, suffix) = value.split_at(digits);
    let ok = !number.is_empty()
        && number.bytes().filter(|b| *b == b'.').count() <= 1
        && number.bytes().any(|b| b.is_ascii_digit())
        && SUFFIXES.contains(&suffix);
    if ok {
        Ok(())
    } else {
        Err(BadValue {
            what,
            value: value.to_string(),
            expected: "a Kubernetes quantity (examples: 100m, 0.5, 128Mi)",
        })
    }
}

fn check_duration(what: &'static str, value: &str) -> Result<std::time::Duration, BadValue> {
    value
        .parse::<outrider_config::Duration>()
        .map(outrider_config::Duration::get)
        .map_err(|_| BadValue {
            what,
            value: value.to_string(),
            expected: "a duration (examples: 30s, 1m30s)",
        })
}

/// A skip-ports annotation (`22,9000-9100`), checked as `outrider-proxy init` will check it,
/// so that a typo fails here rather than in a crash-looping init container; returned without
/// spaces. `protected` is a port the list must not include (init refuses to skip its own
/// inbound port).
fn check_ports(what: &str, value: &str, protected: Option<u16>) -> Result<String, String> {
    let bad = |reason: String| format!("{what} `{value}`: {reason}");
    let port = |text: &str| match text.trim().parse::<u16>() {
        Ok(0) | Err(_) => Err(bad(format!("`{}` is not a port (1-65535)", text.trim()))),
        Ok(port) => Ok(port),
    };
    let mut entries = Vec::new();
    for entry in value.split(',').map(str::trim) {
        let (first, last) = match entry.split_once('-') {
            Some((first, last)) => (port(first)?, port(last)?),
            None => {
                let single = port(entry)?;
                (single, single)
            }
        };
        if first > last {
            return Err(bad(format!("range `{entry}` ends before it starts")));
        }
        if let Some(port) = protected.filter(|p| (first..=last).contains(p)) {
            return Err(bad(format!(
                "`{entry}` includes the proxy's inbound port {port}"
            )));
        }
        entries.push(if first == last {
            first.to_string()
        } else {
            format!("{first}-{last}")
        });
    }
    check_count(what, value, entries.len())?;
    Ok(entries.join(","))
}

/// A skip-CIDRs annotation (`10.0.0.0/8,2001:db8::/32`), checked as `outrider-proxy init`
/// will check it (host bits set after the prefix are refused as a likely typo).
fn check_cidrs(what: &str, value: &str) -> Result<String, String> {
    let mut entries = Vec::new();
    for entry in value.split(',').map(str::trim) {
        let bad = |reason: &str| format!("{what} `{value}`: `{entry}` {reason}");
        let (address, prefix) = entry.split_once('/').unwrap_or((entry, ""));
        let network: IpAddr = address
            .trim()
            .parse()
            .map_err(|_| bad("is not an IPv4 or IPv6 network"))?;
        let (bits, width) = match network {
            IpAddr::V4(v4) => (u128::from(u32::from(v4)), 32u32),
            IpAddr::V6(v6) => (u128::from(v6), 128),
        };
        let prefix = match prefix.trim() {
            "" => width,
            text => text
                .parse::<u32>()
                .ok()
                .filter(|p| *p <= width)
                .ok_or_else(|| bad("has a bad prefix length"))?,
        };
        let host_bits = 1u128
            .checked_shl(width - prefix)
            .map_or(u128::MAX, |bit| bit - 1);
        if bits & host_bits != 0 {
            return Err(bad("has host bits set after its prefix"));
        }
        entries.push(format!("{network}/{prefix}"));
    }
    check_count(what, value, entries.len())?;
    Ok(entries.join(","))
}

fn check_count(what: &str, value: &str, count: usize) -> Result<(), String> {
    if count > MAX_SKIP_ENTRIES {
        return Err(format!(
            "{what} `{value}`: {count} entries; at most {MAX_SKIP_ENTRIES}"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn split_keeps_every_byte_and_finds_markers() {
        let text = "# head\na: 1\n--- # second\nb: 2\n---\n\n---\nc: |\n  ---x\n";
        let docs = split_documents(text);
        let joined: String = docs.iter().map(|d| [d.marker, d.body].concat()).collect();
        assert_eq!(joined, text);
        let bodies: Vec<&str> = docs.iter().map(|d| d.body).collect();
        assert_eq!(bodies, ["# head\na: 1\n", "b: 2\n", "\n", "c: |\n  ---x\n"]);
        assert_eq!(docs[1].marker, "--- # second\n");
    }

    #[test]
    fn quantities_and_durations() {
        for ok in ["100m", "1", "0.5", "128Mi", "1G", "2Gi"] {
            assert!(check_quantity("q", ok).is_ok(), "{ok}");
        }
        for bad in ["", "m", "1.2.3", "128MB", "-1", "lots"] {
            assert!(check_quantity("q", bad).is_err(), "{bad}");
        }
        assert_eq!(
            check_duration("d", "1m30s").ok(),
            Some(std::time::Duration::from_secs(90))
        );
        assert!(check_duration("d", "30").is_err());
    }

    fn options() -> Options {
        Options {
            control: "http://control:15010".to_string(),
            workload: None,
            image: "outrider/outrider:test".to_string(),
            token_secret: "outrider-token".to_string(),
            legacy: false,
            capture: true,
            cpu: "100m".to_string(),
            cpu_limit: "1".to_string(),
            memory: "128Mi".to_string(),
            drain_timeout: "30s".to_string(),
            services: ServiceEnv::default(),
        }
    }

    fn legacy() -> Options {
        Options {
            legacy: true,
            ..options()
        }
    }

    fn explicit() -> Options {
        Options {
            capture: false,
            ..options()
        }
    }

    /// Injects `text` and parses the result back: (document, warnings).
    fn inject(text: &str, options: &Options) -> (Value, Vec<String>) {
        let out = inject_text("test", text, options).unwrap();
        (serde_saphyr::from_str(&out.text).unwrap(), out.warnings)
    }

    /// Injects `text`, then its output again: the second run must change nothing.
    fn inject_twice(text: &str, options: &Options) -> (Value, Vec<String>) {
        let first = inject_text("test", text, options).unwrap();
        let second = inject_text("test", &first.text, options).unwrap();
        assert_eq!(second.text, first.text, "injecting again changed it");
        (serde_saphyr::from_str(&first.text).unwrap(), first.warnings)
    }

    const DEPLOYMENT: &str = "\
apiVersion: apps/v1
kind: Deployment
metadata: {name: shop}
spec:
  template:
    metadata:
      labels: {app: shop}
    spec:
      containers:
      - name: app
        image: shop:1
      - name: worker
        image: worker:1
";

    fn env_of(container: &Value) -> Vec<(String, String)> {
        container["env"]
            .as_sequence()
            .map(|env| {
                env.iter()
                    .map(|e| {
                        let value = e["value"].as_str().unwrap_or("(valueFrom)");
                        (e["name"].as_str().unwrap().to_string(), value.to_string())
                    })
                    .collect()
            })
            .unwrap_or_default()
    }

    fn var(container: &Value, name: &str) -> Option<String> {
        env_of(container)
            .into_iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v)
    }

    fn args_of(container: &Value) -> Vec<&str> {
        container["args"]
            .as_sequence()
            .unwrap()
            .iter()
            .map(|a| a.as_str().unwrap())
            .collect()
    }

    fn flag<'a>(args: &[&'a str], name: &str) -> Option<&'a str> {
        let at = args.iter().position(|a| *a == name)?;
        args.get(at + 1).copied()
    }

    #[test]
    fn capture_adds_a_root_init_container_with_two_capabilities_before_the_sidecar() {
        let (doc, warnings) = inject_twice(DEPLOYMENT, &options());
        assert_eq!(warnings, Vec::<String>::new());
        let spec = &doc["spec"]["template"]["spec"];
        let init = &spec["initContainers"][0];
        assert_eq!(init["name"], INIT_NAME);
        assert_eq!(init["image"], "outrider/outrider:test");
        assert_eq!(init["command"][0], "/usr/local/bin/outrider-proxy");
        let args = args_of(init);
        assert_eq!(args[0], "init");
        assert_eq!(flag(&args, "--inbound-port"), Some("15006"));
        assert_eq!(flag(&args, "--outbound-port"), Some("15001"));
        assert_eq!(flag(&args, "--admin-port"), Some("15000"));
        assert_eq!(flag(&args, "--skip-inbound-ports"), None);
        assert!(
            init.get("restartPolicy").is_none(),
            "a plain init container"
        );
        let security = &init["securityContext"];
        assert_eq!(security["runAsUser"], 0);
        assert_eq!(security["runAsNonRoot"], false);
        assert_eq!(security["allowPrivilegeEscalation"], false);
        assert_eq!(security["readOnlyRootFilesystem"], true);
        assert!(security.get("privileged").is_none());
        assert_eq!(
            security["capabilities"]["drop"],
            Value::Sequence(vec![s("ALL")])
        );
        assert_eq!(
            security["capabilities"]["add"],
            Value::Sequence(vec![s("NET_ADMIN"), s("NET_RAW")])
        );
        assert_eq!(security["seccompProfile"]["type"], "RuntimeDefault");
        // The iptables tools' lock file needs a writable /run on a read-only root.
        assert_eq!(init["volumeMounts"][0]["mountPath"], "/run");
        let volumes = spec["volumes"].as_sequence().unwrap();
        assert!(volumes.iter().any(|v| v["name"] == INIT_RUN_VOLUME));

        // The proxy runs as the uid the rules exempt, unprivileged.
        let proxy = &spec["initContainers"][1];
        assert_eq!(proxy["name"], SIDECAR_NAME);
        assert_eq!(proxy["restartPolicy"], "Always");
        assert_eq!(proxy["securityContext"]["runAsUser"], 65532);
        assert_eq!(flag(&args, "--proxy-uid"), Some("65532"));
        assert!(proxy["securityContext"]["capabilities"]
            .get("add")
            .is_none());
        assert!(!args_of(proxy).contains(&"--shutdown-endpoint"));

        // The app is not told about the proxy at all.
        for container in spec["containers"].as_sequence().unwrap() {
            assert_eq!(env_of(container), Vec::new(), "{container:?}");
            assert!(container.get("env").is_none());
        }
        let annotations = &doc["spec"]["template"]["metadata"]["annotations"];
        assert_eq!(annotations[ANNOTATION_INJECTED_TRAFFIC], "capture");
    }

    #[test]
    fn capture_leaves_the_apps_own_proxy_and_takes_back_what_explicit_injection_set() {
        let (explicit_doc, _) = inject(
            &DEPLOYMENT.replace(
                "image: shop:1\n",
                "image: shop:1\n        env: [{name: HTTP_PROXY, value: 'http://corp:3128'}]\n",
            ),
            &explicit(),
        );
        let text = serde_saphyr::to_string(&explicit_doc).unwrap();
        let (doc, _) = inject(&text, &options());
        let containers = &doc["spec"]["template"]["spec"]["containers"];
        assert_eq!(
            env_of(&containers[0]),
            [("HTTP_PROXY".to_string(), "http://corp:3128".to_string())]
        );
        assert!(containers[1].get("env").is_none(), "{:?}", containers[1]);
        // The same as injecting the original with capture.
        let (direct, _) = inject(
            &DEPLOYMENT.replace(
                "image: shop:1\n",
                "image: shop:1\n        env: [{name: HTTP_PROXY, value: 'http://corp:3128'}]\n",
            ),
            &options(),
        );
        assert_eq!(doc, direct);
    }

    #[test]
    fn explicit_mode_points_the_app_at_the_proxy_without_an_init_container() {
        assert_eq!(PROXY_URL, format!("http://127.0.0.1:{OUTBOUND_PORT}"));
        let (doc, warnings) = inject_twice(DEPLOYMENT, &explicit());
        assert_eq!(warnings, Vec::<String>::new());
        let spec = &doc["spec"]["template"]["spec"];
        assert_eq!(spec["initContainers"][0]["name"], SIDECAR_NAME);
        assert_eq!(spec["initContainers"].as_sequence().unwrap().len(), 1);
        let volumes = spec["volumes"].as_sequence().unwrap();
        assert!(!volumes.iter().any(|v| v["name"] == INIT_RUN_VOLUME));
        for container in spec["containers"].as_sequence().unwrap() {
            assert_eq!(
                env_of(container),
                [
                    ("HTTP_PROXY", PROXY_URL),
                    ("http_proxy", PROXY_URL),
                    ("NO_PROXY", "127.0.0.1,localhost,::1"),
                    ("no_proxy", "127.0.0.1,localhost,::1"),
                ]
                .map(|(n, v)| (n.to_string(), v.to_string()))
            );
        }
        let annotations = &doc["spec"]["template"]["metadata"]["annotations"];
        assert_eq!(annotations[ANNOTATION_INJECTED_TRAFFIC], "explicit");
    }

    #[test]
    fn explicit_mode_keeps_the_apps_own_proxy_with_a_warning_and_merges_no_proxy() {
        let text = DEPLOYMENT.replace(
            "image: shop:1\n",
            "image: shop:1
        env:
        - {name: LOG, value: info}
        - {name: http_proxy, value: 'http://corp:3128'}
        - {name: NO_PROXY, value: '.corp.example, localhost'}
",
        );
        let (doc, warnings) = inject_twice(&text, &explicit());
        let app = &doc["spec"]["template"]["spec"]["containers"][0];
        assert_eq!(
            env_of(app),
            [
                ("LOG", "info"),
                ("http_proxy", "http://corp:3128"),
                ("NO_PROXY", ".corp.example,localhost,127.0.0.1,::1"),
                ("no_proxy", ".corp.example,localhost,127.0.0.1,::1"),
            ]
            .map(|(n, v)| (n.to_string(), v.to_string())),
            "no HTTP_PROXY of ours beside the app's own http_proxy"
        );
        assert_eq!(warnings.len(), 1, "{warnings:?}");
        assert!(
            warnings[0].starts_with(
                "Deployment/shop container app keeps its own http_proxy=http://corp:3128"
            ),
            "{warnings:?}"
        );
        // The other container, with no proxy of its own, gets ours.
        let worker = &doc["spec"]["template"]["spec"]["containers"][1];
        assert_eq!(var(worker, "HTTP_PROXY").as_deref(), Some(PROXY_URL));
    }

    #[test]
    fn explicit_mode_leaves_a_no_proxy_from_value_from_alone_with_a_warning() {
        let text = DEPLOYMENT.replace(
            "image: shop:1\n",
            "image: shop:1
        env:
        - name: NO_PROXY
          valueFrom: {configMapKeyRef: {name: proxy, key: no_proxy}}
",
        );
        let (doc, warnings) = inject(&text, &explicit());
        let app = &doc["spec"]["template"]["spec"]["containers"][0];
        assert_eq!(var(app, "NO_PROXY").as_deref(), Some("(valueFrom)"));
        assert_eq!(
            var(app, "no_proxy").as_deref(),
            Some("127.0.0.1,localhost,::1")
        );
        assert_eq!(var(app, "HTTP_PROXY").as_deref(), Some(PROXY_URL));
        assert_eq!(warnings.len(), 1, "{warnings:?}");
        assert!(
            warnings[0].contains("NO_PROXY comes from valueFrom"),
            "{warnings:?}"
        );
    }

    #[test]
    fn host_network_pods_are_skipped_with_a_warning() {
        let text = "apiVersion: apps/v1\nkind: DaemonSet  # node agent\nmetadata: {name: agent}\nspec:\n  template:\n    spec:\n      hostNetwork: true\n      containers: [{name: a, image: a}]\n";
        for options in [options(), explicit(), legacy()] {
            let out = inject_text("test", text, &options).unwrap();
            assert_eq!(out.text, text, "written back byte for byte");
            assert_eq!(
                out.warnings,
                ["DaemonSet/agent: not injected: hostNetwork pods share the node's network namespace"]
            );
        }
        // hostNetwork: false is an ordinary pod.
        let (doc, warnings) = inject(&text.replace("true", "false"), &options());
        assert!(warnings.is_empty());
        assert_eq!(
            doc["spec"]["template"]["spec"]["initContainers"][0]["name"],
            INIT_NAME
        );
    }

    #[test]
    fn skip_annotations_become_init_flags_and_bad_ones_are_refused() {
        let text = DEPLOYMENT.replace(
            "    metadata:\n",
            "    metadata:
      annotations:
        outrider.dev/skip-inbound-ports: '22, 9000-9100'
        outrider.dev/skip-outbound-ports: '5432'
        outrider.dev/skip-outbound-cidrs: '10.0.0.0/8,2001:db8::/32,192.0.2.7'
",
        );
        let (doc, _) = inject_twice(&text, &options());
        let args = args_of(&doc["spec"]["template"]["spec"]["initContainers"][0]);
        assert_eq!(flag(&args, "--skip-inbound-ports"), Some("22,9000-9100"));
        assert_eq!(flag(&args, "--skip-outbound-ports"), Some("5432"));
        assert_eq!(
            flag(&args, "--skip-outbound-cidrs"),
            Some("10.0.0.0/8,2001:db8::/32,192.0.2.7/32")
        );

        // Without capture they do nothing, and the operator is told.
        let (_, warnings) = inject(&text, &explicit());
        assert_eq!(
            warnings,
            ["Deployment/shop: the outrider.dev/skip-* annotations have no effect: its traffic is not captured"]
        );

        for (annotation, value, reason) in [
            ("skip-inbound-ports", "0", "`0` is not a port (1-65535)"),
            (
                "skip-inbound-ports",
                "9100-9000",
                "range `9100-9000` ends before it starts",
            ),
            (
                "skip-inbound-ports",
                "15000-15010",
                "includes the proxy's inbound port 15006",
            ),
            ("skip-outbound-ports", "http", "`http` is not a port"),
            (
                "skip-outbound-cidrs",
                "10.1.2.3/8",
                "`10.1.2.3/8` has host bits set",
            ),
            (
                "skip-outbound-cidrs",
                "10.0.0.0/33",
                "`10.0.0.0/33` has a bad prefix length",
            ),
            (
                "skip-outbound-cidrs",
                "example.com",
                "is not an IPv4 or IPv6 network",
            ),
        ] {
            let text = DEPLOYMENT.replace(
                "    metadata:\n",
                &format!(
                    "    metadata:\n      annotations: {{outrider.dev/{annotation}: '{value}'}}\n"
                ),
            );
            let err = inject_text("test", &text, &options()).unwrap_err();
            assert_eq!(err.exit_code(), 64);
            let message = err.to_string();
            assert!(
                message.starts_with(&format!(
                    "Deployment/shop: outrider.dev/{annotation} `{value}`: "
                )),
                "{message}"
            );
            assert!(message.contains(reason), "{message}");
        }
        let many = (1..=65)
            .map(|p| p.to_string())
            .collect::<Vec<_>>()
            .join(",");
        assert!(check_ports("p", &many, None)
            .unwrap_err()
            .contains("65 entries; at most 64"));
    }

    #[test]
    fn the_capture_annotation_overrides_the_flag_per_workload() {
        let annotated = |value: &str| {
            DEPLOYMENT.replace(
                "metadata: {name: shop}",
                &format!(
                    "metadata: {{name: shop, annotations: {{outrider.dev/capture: '{value}'}}}}"
                ),
            )
        };
        let (doc, _) = inject(&annotated("false"), &options());
        let template = &doc["spec"]["template"];
        assert_eq!(template["spec"]["initContainers"][0]["name"], SIDECAR_NAME);
        assert_eq!(
            template["metadata"]["annotations"][ANNOTATION_INJECTED_TRAFFIC],
            "explicit"
        );
        let (doc, _) = inject(&annotated("true"), &explicit());
        assert_eq!(
            doc["spec"]["template"]["spec"]["initContainers"][0]["name"],
            INIT_NAME
        );
        let err = inject_text("test", &annotated("yes"), &options()).unwrap_err();
        assert_eq!(
            err.to_string(),
            "Deployment/shop: outrider.dev/capture `yes` is not \"true\" or \"false\""
        );
    }

    #[test]
    fn injected_pods_are_labelled_and_record_what_was_done() {
        for (options, sidecar) in [(options(), "native"), (legacy(), "legacy")] {
            let (doc, _) = inject_twice(DEPLOYMENT, &options);
            let metadata = &doc["spec"]["template"]["metadata"];
            assert_eq!(metadata["labels"][LABEL_MESHED], "true");
            assert_eq!(metadata["labels"]["app"], "shop");
            let annotations = &metadata["annotations"];
            // The app, also where the legacy sidecar is the first container.
            assert_eq!(annotations[ANNOTATION_DEFAULT_CONTAINER], "app");
            assert_eq!(
                annotations[ANNOTATION_INJECTED_VERSION],
                env!("CARGO_PKG_VERSION")
            );
            assert_eq!(annotations[ANNOTATION_INJECTED_SIDECAR], sidecar);
            assert_eq!(annotations[ANNOTATION_INJECTED_TRAFFIC], "capture");
        }
        let (doc, _) = inject(DEPLOYMENT, &legacy());
        assert_eq!(
            doc["spec"]["template"]["spec"]["containers"][0]["name"],
            SIDECAR_NAME
        );

        // The app's own choice of default container stays; one naming ours is corrected.
        for (chosen, expected) in [("worker", "worker"), (SIDECAR_NAME, "app")] {
            let text = DEPLOYMENT.replace(
                "      labels: {app: shop}\n",
                &format!(
                    "      labels: {{app: shop}}\n      annotations: {{kubectl.kubernetes.io/default-container: {chosen}}}\n"
                ),
            );
            let (doc, _) = inject(&text, &legacy());
            assert_eq!(
                doc["spec"]["template"]["metadata"]["annotations"][ANNOTATION_DEFAULT_CONTAINER],
                expected
            );
        }
    }

    #[test]
    fn legacy_run_to_completion_pods_get_the_shutdown_endpoint() {
        let job = "apiVersion: batch/v1\nkind: Job\nmetadata: {name: report}\nspec:\n  template:\n    spec:\n      restartPolicy: Never\n      containers: [{name: report, image: r}]\n";
        let cron = "apiVersion: batch/v1\nkind: CronJob\nmetadata: {name: nightly}\nspec:\n  schedule: '0 3 * * *'\n  jobTemplate:\n    spec:\n      template:\n        spec:\n          restartPolicy: OnFailure\n          containers: [{name: nightly, image: n}]\n";
        let pod = "apiVersion: v1\nkind: Pod\nmetadata: {name: once}\nspec:\n  restartPolicy: Never\n  containers: [{name: once, image: o}]\n";
        let server = "apiVersion: v1\nkind: Pod\nmetadata: {name: web}\nspec:\n  containers: [{name: web, image: w}]\n";
        let pod_spec = |doc: &Value| match doc["kind"].as_str().unwrap() {
            "Pod" => doc["spec"].clone(),
            "CronJob" => doc["spec"]["jobTemplate"]["spec"]["template"]["spec"].clone(),
            _ => doc["spec"]["template"]["spec"].clone(),
        };
        let shutdown_url = "http://127.0.0.1:15000/shutdown";
        for (text, finishes) in [
            (job, true),
            (cron, true),
            (pod, true),
            (server, false),
            (DEPLOYMENT, false),
        ] {
            let (doc, _) = inject_twice(text, &legacy());
            let spec = pod_spec(&doc);
            let proxy = &spec["containers"][0];
            assert_eq!(proxy["name"], SIDECAR_NAME);
            assert_eq!(
                args_of(proxy).contains(&"--shutdown-endpoint"),
                finishes,
                "{text}"
            );
            let app = &spec["containers"][1];
            assert_eq!(
                var(app, SHUTDOWN_URL_ENV).as_deref(),
                finishes.then_some(shutdown_url),
                "{text}"
            );

            // Native sidecars end with the pod on their own: no endpoint, and a pod injected
            // in legacy mode before loses it when injected again natively.
            let again = serde_saphyr::to_string(&doc).unwrap();
            let (native, _) = inject(&again, &options());
            let spec = pod_spec(&native);
            let proxy = &spec["initContainers"][1];
            assert!(!args_of(proxy).contains(&"--shutdown-endpoint"));
            assert_eq!(var(&spec["containers"][0], SHUTDOWN_URL_ENV), None);
        }
    }

    #[test]
    fn legacy_capture_warns_that_the_apps_init_containers_run_before_the_proxy() {
        let text = DEPLOYMENT.replace(
            "      containers:\n",
            "      initContainers: [{name: migrate, image: m}]\n      containers:\n",
        );
        let (doc, warnings) = inject(&text, &legacy());
        let init = &doc["spec"]["template"]["spec"]["initContainers"];
        assert_eq!(init[0]["name"], INIT_NAME);
        assert_eq!(init[1]["name"], "migrate");
        assert_eq!(warnings.len(), 1, "{warnings:?}");
        assert!(
            warnings[0]
                .starts_with("Deployment/shop: its init containers run before the legacy sidecar"),
            "{warnings:?}"
        );
        // Natively the sidecar runs before them: nothing to warn about.
        let (doc, warnings) = inject(&text, &options());
        assert!(warnings.is_empty(), "{warnings:?}");
        let names: Vec<_> = doc["spec"]["template"]["spec"]["initContainers"]
            .as_sequence()
            .unwrap()
            .iter()
            .map(|c| c["name"].as_str().unwrap().to_string())
            .collect();
        assert_eq!(names, [INIT_NAME, SIDECAR_NAME, "migrate"]);
    }

    #[test]
    fn an_unquoted_annotation_of_ours_is_refused_not_ignored() {
        for (annotation, value) in [("capture", "false"), ("skip-outbound-ports", "5432")] {
            let text = DEPLOYMENT.replace(
                "metadata: {name: shop}",
                &format!(
                    "metadata: {{name: shop, annotations: {{outrider.dev/{annotation}: {value}}}}}"
                ),
            );
            let err = inject_text("test", &text, &options()).unwrap_err();
            assert_eq!(
                err.to_string(),
                format!(
                    "Deployment/shop: annotation outrider.dev/{annotation} must be a string: \
                     quote it (outrider.dev/{annotation}: \"{value}\")"
                )
            );
            assert_eq!(err.exit_code(), 64);
        }
    }

    #[test]
    fn exit_codes_follow_sysexits() {
        let not_yaml = inject_text("test", "kind: Pod\nspec: [unclosed\n", &options()).unwrap_err();
        assert_eq!(not_yaml.exit_code(), 65);
        let no_containers = inject_text(
            "test",
            "kind: Pod\nmetadata: {name: p}\nspec: {containers: []}\n",
            &options(),
        )
        .unwrap_err();
        assert_eq!(no_containers.to_string(), "Pod/p: spec.containers is empty");
        assert_eq!(no_containers.exit_code(), 64);
        let bad_flag = inject_text(
            "test",
            DEPLOYMENT,
            &Options {
                drain_timeout: "soon".to_string(),
                ..options()
            },
        )
        .unwrap_err();
        assert_eq!(bad_flag.exit_code(), 64);
        let internal = InjectError::Internal {
            object: "Pod/p".to_string(),
            part: "sidecar container",
            message: "x".to_string(),
        };
        assert_eq!(internal.exit_code(), 70);
    }

    const PROBED: &str = "\
apiVersion: v1
kind: Pod
metadata: {name: web}
spec:
  containers:
  - name: app
    image: web:1
    ports: [{name: http, containerPort: 8080}, {name: grpc, containerPort: 9090}]
    livenessProbe:
      httpGet:
        path: /healthz
        port: http
        scheme: HTTPS
        httpHeaders: [{name: X-Probe, value: kubelet}]
      periodSeconds: 5
    readinessProbe:
      tcpSocket: {port: 8080}
      timeoutSeconds: 2
    startupProbe:
      grpc: {port: 9090, service: web}
      failureThreshold: 30
  - name: cache
    image: cache:1
    livenessProbe:
      exec: {command: [cache, ping]}
    readinessProbe:
      httpGet: {host: cache.example, path: /, port: 80}
";

    /// The pod's spec, its proxy container and the proxy's app-probe record.
    fn probes_of(doc: &Value) -> (Value, Option<serde_json::Value>) {
        let spec = doc["spec"].clone();
        let proxy = spec["initContainers"]
            .as_sequence()
            .into_iter()
            .chain(spec["containers"].as_sequence())
            .flatten()
            .find(|c| c["name"] == SIDECAR_NAME)
            .unwrap()
            .clone();
        let record = var(&proxy, APP_PROBES_ENV).map(|json| serde_json::from_str(&json).unwrap());
        (spec, record)
    }

    #[test]
    fn http_tcp_and_grpc_probes_are_pointed_at_the_admin_port_and_recorded() {
        let (doc, warnings) = inject_twice(PROBED, &options());
        assert!(warnings.is_empty(), "{warnings:?}");
        let (spec, record) = probes_of(&doc);
        let app = &spec["containers"][0];
        for (field, kind) in PROBE_KINDS {
            let get = &app[field]["httpGet"];
            assert_eq!(get["path"], format!("/app-health/app/{kind}").as_str());
            assert_eq!(get["port"], 15000);
            assert!(get.get("scheme").is_none() && get.get("httpHeaders").is_none());
            for other in ["tcpSocket", "grpc"] {
                assert!(app[field].get(other).is_none(), "{field}");
            }
        }
        // The timings stay, in their place.
        assert_eq!(app["livenessProbe"]["periodSeconds"], 5);
        assert_eq!(app["readinessProbe"]["timeoutSeconds"], 2);
        assert_eq!(app["startupProbe"]["failureThreshold"], 30);
        // The named port is a number in the record; exec and foreign-host probes are left.
        assert_eq!(
            record.unwrap(),
            serde_json::json!({
                "app/liveness": {"httpGet": {"path": "/healthz", "port": 8080, "scheme": "HTTPS",
                    "httpHeaders": [{"name": "X-Probe", "value": "kubelet"}]}, "timeoutSeconds": 1},
                "app/readiness": {"tcpSocket": {"port": 8080}, "timeoutSeconds": 2},
                "app/startup": {"grpc": {"port": 9090, "service": "web"}, "timeoutSeconds": 1},
            })
        );
        let cache = &spec["containers"][1];
        assert_eq!(cache["livenessProbe"]["exec"]["command"][0], "cache");
        assert_eq!(cache["readinessProbe"]["httpGet"]["host"], "cache.example");
        // The probes connect to the pod's own address.
        let proxy = &spec["initContainers"][1];
        let pod_ip = proxy["env"]
            .as_sequence()
            .unwrap()
            .iter()
            .find(|e| e["name"] == POD_IP_ENV)
            .unwrap();
        assert_eq!(pod_ip["valueFrom"]["fieldRef"]["fieldPath"], "status.podIP");
    }

    #[test]
    fn probes_on_skipped_ports_and_uncaptured_pods_are_left_alone() {
        let skipped = PROBED.replace(
            "metadata: {name: web}",
            "metadata: {name: web, annotations: {outrider.dev/skip-inbound-ports: '22,8000-8999'}}",
        );
        let (doc, _) = inject_twice(&skipped, &options());
        let (spec, record) = probes_of(&doc);
        let app = &spec["containers"][0];
        assert_eq!(app["livenessProbe"]["httpGet"]["port"], "http");
        assert_eq!(app["readinessProbe"]["tcpSocket"]["port"], 8080);
        assert_eq!(app["startupProbe"]["httpGet"]["port"], 15000);
        assert_eq!(
            record
                .unwrap()
                .as_object()
                .unwrap()
                .keys()
                .collect::<Vec<_>>(),
            ["app/startup"]
        );

        // Explicit mode: the pod's probes as written, no record, no pod IP.
        let original: Value = serde_saphyr::from_str(PROBED).unwrap();
        for options in [
            explicit(),
            Options {
                legacy: true,
                ..explicit()
            },
        ] {
            let (doc, _) = inject_twice(PROBED, &options);
            let (spec, record) = probes_of(&doc);
            assert_eq!(record, None);
            let apps: Vec<&Value> = spec["containers"]
                .as_sequence()
                .unwrap()
                .iter()
                .filter(|c| c["name"] != SIDECAR_NAME)
                .collect();
            assert_eq!(apps.len(), 2);
            for (i, app) in apps.into_iter().enumerate() {
                for (field, _) in PROBE_KINDS {
                    let before = &original["spec"]["containers"][i][field];
                    assert_eq!(&app[field], before, "{i} {field}");
                }
            }
        }
    }

    #[test]
    fn native_sidecars_probes_are_rewritten_like_the_apps_and_plain_init_containers_left() {
        let with_sidecar = PROBED.replace(
            "spec:\n  containers:\n",
            "\
spec:
  initContainers:
  - name: migrate
    image: migrate:1
  - name: log-shipper
    image: shipper:1
    restartPolicy: Always
    ports: [{name: health, containerPort: 7070}]
    startupProbe:
      httpGet: {path: /started, port: health}
      failureThreshold: 10
    livenessProbe:
      tcpSocket: {port: 7070}
  containers:
",
        );
        let (doc, warnings) = inject_twice(&with_sidecar, &options());
        assert!(warnings.is_empty(), "{warnings:?}");
        let (spec, record) = probes_of(&doc);
        let names: Vec<&str> = spec["initContainers"]
            .as_sequence()
            .unwrap()
            .iter()
            .map(|c| c["name"].as_str().unwrap())
            .collect();
        assert_eq!(names, [INIT_NAME, SIDECAR_NAME, "migrate", "log-shipper"]);
        let shipper = &spec["initContainers"][3];
        for (field, kind) in [("startupProbe", "startup"), ("livenessProbe", "liveness")] {
            let get = &shipper[field]["httpGet"];
            let path = format!("/app-health/log-shipper/{kind}");
            assert_eq!(get["path"], path.as_str());
            assert_eq!(get["port"], 15000);
            assert!(shipper[field].get("tcpSocket").is_none(), "{field}");
        }
        assert_eq!(shipper["startupProbe"]["failureThreshold"], 10);
        let record = record.unwrap();
        assert_eq!(
            record["log-shipper/startup"],
            serde_json::json!({"httpGet": {"path": "/started", "port": 7070}, "timeoutSeconds": 1})
        );
        assert_eq!(
            record["log-shipper/liveness"],
            serde_json::json!({"tcpSocket": {"port": 7070}, "timeoutSeconds": 1})
        );
        // The app's own are still there: one record for each of the five probes.
        assert_eq!(record.as_object().unwrap().len(), 5);

        // Without capture the sidecar's probes come back as written (the named port a number).
        let (doc, _) = inject(
            &serde_saphyr::to_string(&doc).unwrap(),
            &Options {
                legacy: true,
                ..explicit()
            },
        );
        let shipper = &doc["spec"]["initContainers"][1];
        assert_eq!(shipper["name"], "log-shipper");
        assert_eq!(shipper["startupProbe"]["httpGet"]["port"], 7070);
        assert_eq!(shipper["startupProbe"]["httpGet"]["path"], "/started");
        assert_eq!(shipper["livenessProbe"]["tcpSocket"]["port"], 7070);
    }

    #[test]
    fn injecting_again_restores_the_originals_first() {
        let (captured, _) = inject(PROBED, &options());
        let text = serde_saphyr::to_string(&captured).unwrap();
        // Again with capture: the same (inject_twice checks the text).
        inject_twice(&text, &options());
        // Again as legacy: the record moves with the proxy container.
        let (legacy_doc, _) = inject(&text, &legacy());
        let (legacy_spec, legacy_record) = probes_of(&legacy_doc);
        assert_eq!(legacy_record, probes_of(&captured).1);
        assert_eq!(
            legacy_spec["containers"][1],
            captured["spec"]["containers"][0]
        );
        // Again without capture: the handlers come back (a named port as its number).
        let (doc, _) = inject(&text, &explicit());
        let app = &doc["spec"]["containers"][0];
        assert_eq!(app["livenessProbe"]["httpGet"]["port"], 8080);
        assert_eq!(app["livenessProbe"]["httpGet"]["scheme"], "HTTPS");
        assert_eq!(app["livenessProbe"]["periodSeconds"], 5);
        assert_eq!(app["readinessProbe"]["tcpSocket"]["port"], 8080);
        assert_eq!(app["startupProbe"]["grpc"]["service"], "web");
        let keys: Vec<_> = app["livenessProbe"]
            .as_mapping()
            .unwrap()
            .iter()
            .map(|(k, _)| k.as_str().unwrap().to_string())
            .collect();
        assert_eq!(keys, ["httpGet", "periodSeconds"]);

        // A rewritten probe whose record is gone cannot be restored: said, not guessed.
        let orphan = text.replace(APP_PROBES_ENV, "SOMETHING_ELSE");
        let err = inject_text("test", &orphan, &options()).unwrap_err();
        assert_eq!(
            err.to_string(),
            "Pod/web: container app livenessProbe points at /app-health/app/liveness but the \
             outrider-proxy container has no record of the original probe: restore it by hand"
        );
    }

    #[test]
    fn bad_probes_are_refused_with_the_container_and_probe_named() {
        for (from, to, message) in [
            (
                "port: http\n",
                "port: metrics\n",
                "container app livenessProbe: port `metrics` is not the name of one of the container's ports",
            ),
            (
                "tcpSocket: {port: 8080}",
                "tcpSocket: {port: 70000}",
                "container app readinessProbe: port is not 1-65535 or a port name",
            ),
            (
                "timeoutSeconds: 2",
                "timeoutSeconds: 0",
                "container app readinessProbe: timeoutSeconds is not 1-3600",
            ),
            (
                "grpc: {port: 9090, service: web}",
                "grpc: {port: grpc}",
                "container app startupProbe: grpc.port is not a port number",
            ),
            (
                "scheme: HTTPS",
                "scheme: https",
                "container app livenessProbe: scheme is not HTTP or HTTPS",
            ),
        ] {
            assert!(PROBED.contains(from), "{from}");
            let err = inject_text("test", &PROBED.replace(from, to), &options()).unwrap_err();
            assert_eq!(err.to_string(), format!("Pod/web: {message}"));
            assert_eq!(err.exit_code(), 64);
        }
    }

    #[test]
    fn port_lists_match_single_ports_and_ranges() {
        assert!(in_port_list(Some("22,8000-8999"), 8080));
        assert!(in_port_list(Some("22,8000-8999"), 22));
        assert!(!in_port_list(Some("22,8000-8999"), 9000));
        assert!(!in_port_list(None, 22));
    }
}
