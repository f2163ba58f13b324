//! What the injector adds, typed: the proxy and init containers and their volumes, serialised
//! in the order a person would write them.

use super::*;

/// A container as the Kubernetes API reads it: the fields the injector writes, in the order a
/// person would write them.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub(super) struct Container {
    pub(super) name: &'static str,
    pub(super) image: String,
    /// `Always` makes an init container a native sidecar.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(super) restart_policy: Option<&'static str>,
    pub(super) command: Vec<String>,
    pub(super) args: Vec<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub(super) env: Vec<EnvVar>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub(super) ports: Vec<ContainerPort>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(super) startup_probe: Option<Probe>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(super) liveness_probe: Option<Probe>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(super) readiness_probe: Option<Probe>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(super) lifecycle: Option<Lifecycle>,
    pub(super) resources: Resources,
    pub(super) security_context: SecurityContext,
    pub(super) volume_mounts: Vec<VolumeMount>,
}

/// An env var: a literal value, or one from the downward API (`valueFrom.fieldRef`).
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub(super) struct EnvVar {
    pub(super) name: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(super) value: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(super) value_from: Option<FieldSource>,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub(super) struct FieldSource {
    pub(super) field_ref: FieldRef,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub(super) struct FieldRef {
    pub(super) field_path: &'static str,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub(super) struct ContainerPort {
    pub(super) name: &'static str,
    pub(super) container_port: u16,
    pub(super) protocol: &'static str,
}

/// An HTTP GET probe on the admin port.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub(super) struct Probe {
    pub(super) http_get: HttpGet,
    pub(super) period_seconds: u32,
    pub(super) failure_threshold: u32,
}

#[derive(Debug, Serialize)]
pub(super) struct HttpGet {
    pub(super) path: &'static str,
    pub(super) port: &'static str,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub(super) struct Lifecycle {
    pub(super) post_start: Exec,
}

#[derive(Debug, Serialize)]
pub(super) struct Exec {
    pub(super) exec: Command,
}

#[derive(Debug, Serialize)]
pub(super) struct Command {
    pub(super) command: Vec<String>,
}

#[derive(Debug, Serialize)]
pub(super) struct Resources {
    pub(super) requests: Quantities,
    pub(super) limits: Quantities,
}

#[derive(Debug, Serialize)]
pub(super) struct Quantities {
    pub(super) cpu: String,
    pub(super) memory: String,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub(super) struct SecurityContext {
    pub(super) run_as_non_root: bool,
    pub(super) run_as_user: u32,
    pub(super) run_as_group: u32,
    pub(super) read_only_root_filesystem: bool,
    pub(super) allow_privilege_escalation: bool,
    pub(super) capabilities: Capabilities,
    pub(super) seccomp_profile: SeccompProfile,
}

/// Dropped first, then added (the order the kernel's bounding set is built in).
#[derive(Debug, Serialize)]
pub(super) struct Capabilities {
    pub(super) drop: Vec<&'static str>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub(super) add: Vec<&'static str>,
}

#[derive(Debug, Serialize)]
pub(super) struct SeccompProfile {
    #[serde(rename = "type")]
    pub(super) kind: &'static str,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub(super) struct VolumeMount {
    pub(super) name: &'static str,
    pub(super) mount_path: &'static str,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub(super) read_only: bool,
}

/// A pod volume: exactly one of the sources is set.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub(super) struct Volume {
    pub(super) name: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(super) secret: Option<SecretSource>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(super) empty_dir: Option<EmptyDir>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(super) projected: Option<Projected>,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub(super) struct SecretSource {
    pub(super) secret_name: String,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub(super) struct EmptyDir {
    pub(super) size_limit: &'static str,
}

#[derive(Debug, Serialize)]
pub(super) struct Projected {
    pub(super) sources: Vec<ProjectedSource>,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub(super) struct ProjectedSource {
    pub(super) service_account_token: ServiceAccountToken,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub(super) struct ServiceAccountToken {
    pub(super) audience: &'static str,
    pub(super) expiration_seconds: u64,
    pub(super) path: &'static str,
}

/// A typed part as the ordered value the pod is edited in. Through text: serde has no
/// in-memory transcoder, and one more small document costs nothing next to the manifest.
pub(super) fn to_value<T: Serialize>(part: &T, name: &'static str) -> Result<Value, PodError> {
    let encode = |message: String| PodError::Encode {
        part: name,
        message,
    };
    let text = serde_saphyr::to_string(part).map_err(|e| encode(e.to_string()))?;
    serde_saphyr::from_str(&text).map_err(|e| encode(e.to_string()))
}

pub(super) fn strings<const N: usize>(items: [&str; N]) -> Vec<String> {
    items.into_iter().map(str::to_string).collect()
}

/// The proxy container; `app_probes` is the JSON of the app's probes it performs, if any.
pub(super) fn sidecar_container(sidecar: &Sidecar<'_>, app_probes: Option<&str>) -> Container {
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
pub(super) fn init_container(sidecar: &Sidecar<'_>) -> Container {
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
pub(super) fn sidecar_volumes(sidecar: &Sidecar<'_>) -> Vec<Volume> {
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
