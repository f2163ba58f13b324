//! The app's probes: rewritten to go through the proxy's admin port (`/app-health/`), and the
//! records the proxy performs them from.

use super::*;

/// The probe fields of a container and the kind each is called in `/app-health/`.
pub(super) const PROBE_KINDS: [(&str, &str); 3] = [
    ("livenessProbe", "liveness"),
    ("readinessProbe", "readiness"),
    ("startupProbe", "startup"),
];

/// The handlers a probe may have; the first three are the ones that connect to a port.
pub(super) const PROBE_HANDLERS: [&str; 4] = ["httpGet", "tcpSocket", "grpc", "exec"];

/// The probes an earlier injection rewrote, from its proxy container's `OUTRIDER_APP_PROBES`.
pub(super) fn earlier_app_probes(spec: &Mapping) -> Result<ProbeRecords, String> {
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
pub(super) fn rewrite_probes(
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

pub(super) fn encode_msg(e: PodError) -> String {
    match e {
        PodError::Shape(message) | PodError::Encode { message, .. } => message,
    }
}

/// Whether an init container is a native sidecar: started before the app and kept running.
pub(super) fn is_native_sidecar(container: &Value) -> bool {
    container.get("restartPolicy").and_then(Value::as_str) == Some("Always")
}

/// Whether `probe` is this injector's rewrite of probe `key`.
pub(super) fn is_rewritten(probe: &Mapping, key: &str) -> bool {
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
pub(super) fn replace_handler(probe: &mut Mapping, handler: &str, value: Value) {
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
pub(super) fn probe_record(
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
pub(super) fn resolve_port(
    port: Option<&Value>,
    ports: Option<&Value>,
    what: &str,
) -> Result<u16, String> {
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
pub(super) fn in_port_list(list: Option<&str>, port: u16) -> bool {
    list.into_iter().flat_map(|l| l.split(',')).any(|entry| {
        let (first, last) = entry.split_once('-').unwrap_or((entry, entry));
        matches!(
            (first.parse::<u16>(), last.parse::<u16>()),
            (Ok(first), Ok(last)) if (first..=last).contains(&port)
        )
    })
}
