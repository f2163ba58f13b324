//! Multi-document YAML: splitting at `---` lines, and what is done to each document (which
//! workloads get the sidecar, where their pod template is).

use super::*;

/// One document: its `---` line (empty for the first one when it has none) and its text.
pub(super) struct Document<'a> {
    pub(super) marker: &'a str,
    pub(super) body: &'a str,
}

/// Splits at lines that start a document (`---` alone or followed by a space or a comment).
/// Concatenating every marker and body gives back `text` exactly.
pub(super) fn split_documents(text: &str) -> Vec<Document<'_>> {
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
pub(super) fn inject_value(
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
pub(super) fn annotations(value: &Value) -> Result<Vec<(String, String)>, String> {
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

pub(super) fn label(value: &Value, key: &str) -> Option<String> {
    value
        .get("metadata")?
        .get("labels")?
        .get(key)?
        .as_str()
        .map(str::to_string)
}

pub(super) fn walk<'a>(mut value: &'a Value, path: &[&str]) -> Option<&'a Value> {
    for key in path {
        value = value.get(key)?;
    }
    Some(value)
}

pub(super) fn walk_mut<'a>(mut value: &'a mut Value, path: &[&str]) -> Option<&'a mut Value> {
    for key in path {
        value = value.get_mut(key)?;
    }
    Some(value)
}
