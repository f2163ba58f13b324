//! `outriderctl inject`: adds the Outrider sidecar to Kubernetes workload manifests.
//!
//! Input is multi-document YAML. Documents are split at their `---` lines and each is handled
//! alone: Pods, Deployments, StatefulSets, DaemonSets, ReplicaSets, Jobs and CronJobs (also
//! inside a `kind: List`) get the sidecar; every other document, and every workload that opts
//! out with `outrider.dev/inject: "false"`, is written back byte for byte. Injected documents
//! are re-serialised, so their comments are lost (the value read keeps no comments).
//!
//! Injection replaces what an earlier injection added (same container, volume and env names)
//! instead of adding it again, so injecting twice changes nothing.

use std::fmt;
use std::io::Read;
use std::net::IpAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use crate::yaml::{Mapping, Value};

/// Name of the injected container; also how an earlier injection is recognised.
pub const SIDECAR_NAME: &str = "outrider-proxy";
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

/// The proxy's admin port inside the pod (probes and Prometheus scrape it).
pub const ADMIN_PORT: u16 = 15000;
/// The proxy's shared outbound port, on loopback.
pub const OUTBOUND_PORT: u16 = 15001;
/// The proxy's inbound port.
pub const INBOUND_PORT: u16 = 15006;

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
/// The image's binaries live here (see deploy/Dockerfile).
const BIN_DIR: &str = "/usr/local/bin";
/// Seconds the pod keeps beyond the drain timeout before the kubelet kills it.
const GRACE_MARGIN_SECS: u64 = 5;

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
    /// Sidecar image.
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
    /// The policy given with `--policy` is invalid.
    #[error("{0}")]
    Policy(String),
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

/// Runs `outriderctl inject`: exit 0 with the manifests on stdout, 64 for bad flags, bad
/// annotations or an invalid policy, 65 for input that is not YAML, 66 for unreadable input.
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
                if i > 0 && !injected.starts_with("---") {
                    out.push_str("---\n");
                }
                out.push_str(&injected);
                if !out.ends_with('\n') {
                    out.push('\n');
                }
            }
            Err(e) => {
                eprintln!("outriderctl: {e}");
                return ExitCode::from(match e {
                    InjectError::Yaml { .. } => 65,
                    InjectError::Encode { .. } => 70,
                    _ => 64,
                });
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
) -> Result<String, InjectError> {
    check_quantity("--proxy-cpu", &options.cpu)?;
    check_quantity("--proxy-cpu-limit", &options.cpu_limit)?;
    check_quantity("--proxy-memory", &options.memory)?;
    check_duration("--drain-timeout", &options.drain_timeout)?;
    let mut out = String::with_capacity(text.len() * 2);
    for (index, doc) in split_documents(text).into_iter().enumerate() {
        out.push_str(doc.marker);
        let mut value: Value = if doc.body.trim().is_empty() {
            Value::Null
        } else {
            serde_saphyr::from_str(doc.body).map_err(|error| InjectError::Yaml {
                source_name: source_name.to_string(),
                index: index + 1,
                error: Box::new(error),
            })?
        };
        if inject_value(&mut value, options)? {
            let serialized =
                serde_saphyr::to_string(&value).map_err(|error| InjectError::Encode {
                    source_name: source_name.to_string(),
                    index: index + 1,
                    error,
                })?;
            out.push_str(&serialized);
        } else {
            out.push_str(doc.body);
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
/// and must be re-serialised.
fn inject_value(value: &mut Value, options: &Options) -> Result<bool, InjectError> {
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
                changed |= inject_value(item, options)?;
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
    let outer = annotations(value);
    let template = walk(value, template_path)
        .ok_or_else(|| invalid(format!("no pod template at {}", template_path.join("."))))?;
    let mut notes = outer;
    notes.extend(annotations(template));
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
    let cpu = note(ANNOTATION_CPU).unwrap_or_else(|| options.cpu.clone());
    let memory = note(ANNOTATION_MEMORY).unwrap_or_else(|| options.memory.clone());
    let drain = note(ANNOTATION_DRAIN).unwrap_or_else(|| options.drain_timeout.clone());
    check_quantity(ANNOTATION_CPU, &cpu).map_err(|e| invalid(e.to_string()))?;
    check_quantity(ANNOTATION_MEMORY, &memory).map_err(|e| invalid(e.to_string()))?;
    let drain_duration =
        check_duration(ANNOTATION_DRAIN, &drain).map_err(|e| invalid(e.to_string()))?;
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
        workload: &workload,
        cpu: &cpu,
        memory: &memory,
        drain: &drain,
    };
    inject_pod(template, &sidecar, drain_duration).map_err(invalid)?;
    Ok(true)
}

/// `metadata.annotations` of `value` as pairs.
fn annotations(value: &Value) -> Vec<(String, String)> {
    let Some(Value::Mapping(map)) = value.get("metadata").and_then(|m| m.get("annotations")) else {
        return Vec::new();
    };
    map.iter()
        .filter_map(|(k, v)| Some((k.as_str()?.to_string(), v.as_str()?.to_string())))
        .collect()
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
    workload: &'a str,
    cpu: &'a str,
    memory: &'a str,
    drain: &'a str,
}

/// Adds the sidecar to a pod (or pod template) `{metadata, spec}`.
fn inject_pod(
    pod: &mut Value,
    sidecar: &Sidecar<'_>,
    drain: std::time::Duration,
) -> Result<(), String> {
    let pod = pod
        .as_mapping_mut()
        .ok_or("the pod template is not a mapping")?;
    if !pod.contains_key("metadata") {
        insert_before(pod, "spec", "metadata", Value::Mapping(Mapping::new()));
    }
    let metadata = entry_map(pod, "metadata")?;
    let annotations = entry_map(metadata, "annotations")?;
    set(annotations, "prometheus.io/scrape", s("true"));
    set(
        annotations,
        "prometheus.io/port",
        s(&ADMIN_PORT.to_string()),
    );
    set(annotations, "prometheus.io/path", s("/metrics"));

    let spec = entry_map(pod, "spec")?;
    // Remove an earlier injection wherever it was (native or legacy), then add ours.
    for list in ["initContainers", "containers"] {
        if let Some(Value::Sequence(containers)) = spec.get_mut(list) {
            containers.retain(|c| c.get("name").and_then(Value::as_str) != Some(SIDECAR_NAME));
        }
    }
    if let Some(Value::Sequence(init)) = spec.get("initContainers") {
        if init.is_empty() {
            spec.shift_remove("initContainers");
        }
    }
    let app_count = match spec.get("containers") {
        Some(Value::Sequence(c)) => c.len(),
        _ => 0,
    };
    if app_count == 0 {
        return Err("spec.containers is empty".to_string());
    }
    let env = app_env(sidecar.options);
    if let Some(Value::Sequence(containers)) = spec.get_mut("containers") {
        for container in containers.iter_mut() {
            let container = container
                .as_mapping_mut()
                .ok_or("a container is not a mapping")?;
            let list = entry_seq(container, "env")?;
            for (name, value) in &env {
                set_env(list, name, value);
            }
        }
    }

    // First in line: a native sidecar is started (and must pass its startup probe) before the
    // next init container; a legacy one's postStart hook holds the app containers back.
    let container = sidecar_container(sidecar);
    if sidecar.options.legacy {
        entry_seq(spec, "containers")?.insert(0, container);
    } else {
        if !spec.contains_key("initContainers") {
            // Where a person would write it: just before `containers`.
            insert_before(
                spec,
                "containers",
                "initContainers",
                Value::Sequence(Vec::new()),
            );
        }
        entry_seq(spec, "initContainers")?.insert(0, container);
    }

    let volumes = entry_seq(spec, "volumes")?;
    volumes.retain(|v| {
        let name = v.get("name").and_then(Value::as_str);
        name != Some(TOKEN_VOLUME) && name != Some(STATE_VOLUME) && name != Some(IDENTITY_VOLUME)
    });
    volumes.push(map([
        ("name", s(TOKEN_VOLUME)),
        (
            "secret",
            map([("secretName", s(&sidecar.options.token_secret))]),
        ),
    ]));
    volumes.push(map([
        ("name", s(STATE_VOLUME)),
        ("emptyDir", map([("sizeLimit", s("16Mi"))])),
    ]));
    volumes.push(map([
        ("name", s(IDENTITY_VOLUME)),
        (
            "projected",
            map([(
                "sources",
                Value::Sequence(vec![map([(
                    "serviceAccountToken",
                    map([
                        ("audience", s(IDENTITY_AUDIENCE)),
                        ("expirationSeconds", Value::from(IDENTITY_TOKEN_SECS)),
                        ("path", s("token")),
                    ]),
                )])]),
            )]),
        ),
    ]));

    // The kubelet kills the pod when the grace period ends: leave the drain room to finish.
    let needed = drain.as_secs() + u64::from(drain.subsec_nanos() > 0) + GRACE_MARGIN_SECS;
    let current = spec
        .get("terminationGracePeriodSeconds")
        .and_then(Value::as_u64)
        .unwrap_or(30);
    if current < needed {
        set(spec, "terminationGracePeriodSeconds", Value::from(needed));
    }
    Ok(())
}

/// Env vars every app container gets.
fn app_env(options: &Options) -> Vec<(String, String)> {
    let proxy = format!("http://127.0.0.1:{OUTBOUND_PORT}");
    let no_proxy = "127.0.0.1,localhost,::1".to_string();
    // Both spellings: curl and many Go/Python clients read only the lowercase http_proxy.
    let mut env = vec![
        ("HTTP_PROXY".to_string(), proxy.clone()),
        ("http_proxy".to_string(), proxy),
        ("NO_PROXY".to_string(), no_proxy.clone()),
        ("no_proxy".to_string(), no_proxy),
    ];
    env.extend(options.services.0.iter().cloned());
    env
}

fn sidecar_container(sidecar: &Sidecar<'_>) -> Value {
    let options = sidecar.options;
    let args = [
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
    ];
    let http_get = |path: &str| map([("httpGet", map([("path", s(path)), ("port", s("admin"))]))]);
    let mut startup = http_get("/ready");
    extend(
        &mut startup,
        [
            ("periodSeconds", Value::from(1)),
            ("failureThreshold", Value::from(120)),
        ],
    );
    let mut liveness = http_get("/live");
    extend(
        &mut liveness,
        [
            ("periodSeconds", Value::from(10)),
            ("failureThreshold", Value::from(3)),
        ],
    );
    let mut readiness = http_get("/ready");
    extend(
        &mut readiness,
        [
            ("periodSeconds", Value::from(2)),
            ("failureThreshold", Value::from(1)),
        ],
    );
    let port = |name: &str, port: u16| {
        map([
            ("name", s(name)),
            ("containerPort", Value::from(port)),
            ("protocol", s("TCP")),
        ])
    };
    let mut container = map([
        ("name", s(SIDECAR_NAME)),
        ("image", s(&options.image)),
        ("command", seq([format!("{BIN_DIR}/outrider-proxy")])),
        ("args", seq(args)),
        (
            "env",
            Value::Sequence(
                [
                    ("POD_NAME", "metadata.name"),
                    ("POD_NAMESPACE", "metadata.namespace"),
                    ("POD_SERVICE_ACCOUNT", "spec.serviceAccountName"),
                ]
                .into_iter()
                .map(|(name, field)| {
                    map([
                        ("name", s(name)),
                        (
                            "valueFrom",
                            map([("fieldRef", map([("fieldPath", s(field))]))]),
                        ),
                    ])
                })
                .collect(),
            ),
        ),
        (
            "ports",
            Value::Sequence(vec![
                port("admin", ADMIN_PORT),
                port("inbound", INBOUND_PORT),
            ]),
        ),
        ("startupProbe", startup),
        ("livenessProbe", liveness),
        ("readinessProbe", readiness),
        (
            "resources",
            map([
                (
                    "requests",
                    map([("cpu", s(sidecar.cpu)), ("memory", s(sidecar.memory))]),
                ),
                (
                    "limits",
                    map([
                        ("cpu", s(&options.cpu_limit)),
                        ("memory", s(sidecar.memory)),
                    ]),
                ),
            ]),
        ),
        (
            "securityContext",
            map([
                ("runAsNonRoot", Value::from(true)),
                ("runAsUser", Value::from(65532)),
                ("runAsGroup", Value::from(65532)),
                ("readOnlyRootFilesystem", Value::from(true)),
                ("allowPrivilegeEscalation", Value::from(false)),
                ("capabilities", map([("drop", seq(["ALL"]))])),
                ("seccompProfile", map([("type", s("RuntimeDefault"))])),
            ]),
        ),
        (
            "volumeMounts",
            Value::Sequence(vec![
                map([
                    ("name", s(TOKEN_VOLUME)),
                    ("mountPath", s(TOKEN_DIR)),
                    ("readOnly", Value::from(true)),
                ]),
                map([("name", s(STATE_VOLUME)), ("mountPath", s(STATE_DIR))]),
                map([
                    ("name", s(IDENTITY_VOLUME)),
                    ("mountPath", s(IDENTITY_DIR)),
                    ("readOnly", Value::from(true)),
                ]),
            ]),
        ),
    ]);
    if options.legacy {
        // No shell in the image: outriderctl (same image) polls /ready; the kubelet starts the
        // next container only once this hook returns.
        let hook = map([(
            "postStart",
            map([(
                "exec",
                map([(
                    "command",
                    seq([
                        format!("{BIN_DIR}/outriderctl"),
                        "wait-ready".to_string(),
                        "--admin".to_string(),
                        format!("127.0.0.1:{ADMIN_PORT}"),
                        "--timeout".to_string(),
                        "120s".to_string(),
                    ]),
                )]),
            )]),
        )]);
        insert_after(&mut container, "readinessProbe", "lifecycle", hook);
    } else {
        insert_after(&mut container, "image", "restartPolicy", s("Always"));
    }
    container
}

fn s(text: &str) -> Value {
    Value::String(text.to_string())
}

fn seq<I, T>(items: I) -> Value
where
    I: IntoIterator<Item = T>,
    T: AsRef<str>,
{
    Value::Sequence(items.into_iter().map(|i| s(i.as_ref())).collect())
}

fn map<const N: usize>(pairs: [(&str, Value); N]) -> Value {
    let mut m = Mapping::new();
    for (k, v) in pairs {
        m.insert(s(k), v);
    }
    Value::Mapping(m)
}

fn extend<const N: usize>(value: &mut Value, pairs: [(&str, Value); N]) {
    if let Value::Mapping(m) = value {
        for (k, v) in pairs {
            m.insert(s(k), v);
        }
    }
}

/// Inserts `key: v` right after `after`, for a readable field order.
fn insert_after(value: &mut Value, after: &str, key: &str, v: Value) {
    let Value::Mapping(m) = value else { return };
    let mut out = Mapping::with_capacity(m.len() + 1);
    for (k, old) in std::mem::take(m) {
        let hit = k.as_str() == Some(after);
        out.insert(k, old);
        if hit {
            out.insert(s(key), v.clone());
        }
    }
    *m = out;
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

/// Sets env var `name` in `list`, replacing an existing entry in place.
fn set_env(list: &mut Vec<Value>, name: &str, value: &str) {
    let entry = map([("name", s(name)), ("value", s(value))]);
    match list
        .iter_mut()
        .find(|e| e.get("name").and_then(Value::as_str) == Some(name))
    {
        Some(existing) => *existing = entry,
        None => list.push(entry),
    }
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

#[cfg(test)]
mod tests {
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
}
