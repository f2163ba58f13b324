//! The injector's unit tests.

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
        warnings[0]
            .starts_with("Deployment/shop container app keeps its own http_proxy=http://corp:3128"),
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
            &format!("metadata: {{name: shop, annotations: {{outrider.dev/capture: '{value}'}}}}"),
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
