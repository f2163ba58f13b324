//! The edit of one pod (or pod template): the sidecar and init containers, volumes, the app
//! containers' environment.

use super::*;

/// What varies per workload.
pub(super) struct Sidecar<'a> {
    pub(super) options: &'a Options,
    /// `Kind/name`, for warnings.
    pub(super) object: &'a str,
    pub(super) workload: &'a str,
    pub(super) cpu: &'a str,
    pub(super) memory: &'a str,
    pub(super) drain: &'a str,
    /// Traffic captured by the init container, else explicit (`HTTP_PROXY`).
    pub(super) capture: bool,
    pub(super) skips: Skips,
    /// A Job, a CronJob, or a Pod whose restartPolicy is Never or OnFailure.
    pub(super) runs_to_completion: bool,
}

/// The capture exceptions from the skip annotations, checked, as `outrider-proxy init` flags.
#[derive(Debug, Default)]
pub(super) struct Skips {
    pub(super) inbound_ports: Option<String>,
    pub(super) outbound_ports: Option<String>,
    pub(super) outbound_cidrs: Option<String>,
}

impl Skips {
    pub(super) fn is_empty(&self) -> bool {
        self.inbound_ports.is_none()
            && self.outbound_ports.is_none()
            && self.outbound_cidrs.is_none()
    }
}

/// Why a pod could not be injected.
pub(super) enum PodError {
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
pub(super) fn inject_pod(
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
pub(super) fn edit_app_env(
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
pub(super) fn set_proxy_env(list: &mut Vec<Value>, who: &str, warnings: &mut Vec<String>) {
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

pub(super) fn env_name(entry: &Value) -> Option<&str> {
    entry.get("name").and_then(Value::as_str)
}

/// An env entry's literal value (empty if it has none); `None` when it comes from `valueFrom`.
pub(super) fn env_value(entry: &Value) -> Option<&str> {
    if entry.get("valueFrom").is_some() {
        return None;
    }
    match entry.get("value") {
        None | Some(Value::Null) => Some(""),
        Some(value) => value.as_str(),
    }
}

/// Sets env var `name` in `list`, replacing an existing entry in place.
pub(super) fn set_env(list: &mut Vec<Value>, name: &str, value: &str) {
    let mut entry = Mapping::with_capacity(2);
    entry.insert(s("name"), s(name));
    entry.insert(s("value"), s(value));
    let entry = Value::Mapping(entry);
    match list.iter_mut().find(|e| env_name(e) == Some(name)) {
        Some(existing) => *existing = entry,
        None => list.push(entry),
    }
}
