//! `outriderctl inject` on fixture manifests, compared with golden files: the real binary, fed
//! by files, `-` and standard input. Injecting a golden file again must give it back unchanged
//! (idempotence); kinds that are not workloads and opted-out workloads come back byte for byte.
//! `UPDATE_GOLDEN=1 cargo test -p outrider-control --test inject` rewrites the golden files.

#![allow(clippy::unwrap_used, missing_docs)]

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use outrider_control::yaml::Value;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn fixture(name: &str) -> PathBuf {
    root().join("tests/fixtures/inject").join(name)
}

/// Runs `outriderctl inject ARGS`, with `stdin` on its standard input.
fn inject(args: &[&str], stdin: &str) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_outriderctl"))
        .arg("inject")
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // A run that fails before reading its input closes the pipe early: not an error here.
    let _ = child.stdin.take().unwrap().write_all(stdin.as_bytes());
    child.wait_with_output().unwrap()
}

fn stdout_ok(out: &Output) -> String {
    assert!(
        out.status.success(),
        "exit {:?}: {}",
        out.status.code(),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout.clone()).unwrap()
}

/// Compares `actual` with the golden file `path` (or rewrites it with UPDATE_GOLDEN=1), then
/// checks that injecting it again with the same `args` changes nothing.
fn golden(path: &Path, actual: &str, args: &[&str]) {
    if std::env::var_os("UPDATE_GOLDEN").is_some() {
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, actual).unwrap();
    }
    let expected = std::fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("{}: {e} (UPDATE_GOLDEN=1 writes it)", path.display()));
    assert_eq!(actual, expected, "{} differs", path.display());
    let again = stdout_ok(&inject(args, actual));
    assert_eq!(
        again,
        actual,
        "injecting {} again changed it",
        path.display()
    );
}

fn golden_path(name: &str) -> PathBuf {
    root().join("tests/golden/inject").join(name)
}

/// The containers' names, in order.
fn names(list: &Value) -> Vec<String> {
    list.as_sequence()
        .unwrap()
        .iter()
        .map(|c| c["name"].as_str().unwrap().to_string())
        .collect()
}

fn stderr_of(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn deployment_gets_a_native_sidecar_and_its_traffic_captured() {
    let file = fixture("deployment.yaml");
    let out = inject(&["-f", file.to_str().unwrap()], "");
    let text = stdout_ok(&out);
    assert_eq!(stderr_of(&out), "", "nothing to warn about");
    golden(&golden_path("deployment.native.yaml"), &text, &[]);
    let doc: Value = serde_saphyr::from_str(&text).unwrap();
    let spec = &doc["spec"]["template"]["spec"];
    // The rules first, then the proxy, both before the app.
    assert_eq!(
        names(&spec["initContainers"]),
        ["outrider-init", "outrider-proxy"]
    );
    let init = &spec["initContainers"][0];
    assert_eq!(init["args"][0], "init");
    assert_eq!(init["securityContext"]["runAsUser"], 0);
    assert_eq!(
        init["securityContext"]["capabilities"]["add"][0],
        "NET_ADMIN"
    );
    assert_eq!(init["securityContext"]["capabilities"]["add"][1], "NET_RAW");
    let sidecar = &spec["initContainers"][1];
    assert_eq!(sidecar["restartPolicy"], "Always");
    assert_eq!(sidecar["startupProbe"]["httpGet"]["path"], "/ready");
    assert_eq!(sidecar["livenessProbe"]["httpGet"]["path"], "/live");
    assert_eq!(sidecar["securityContext"]["runAsUser"], 65532);
    assert_eq!(sidecar["securityContext"]["readOnlyRootFilesystem"], true);
    assert_eq!(sidecar["securityContext"]["capabilities"]["drop"][0], "ALL");
    assert_eq!(sidecar["ports"][0]["name"], "admin");
    // The sidecar is not among the app containers, and the app is not pointed at it: its own
    // HTTP_PROXY stays, the other container gets no proxy variables.
    let containers = &spec["containers"];
    assert_eq!(names(containers), ["app", "worker"]);
    assert_eq!(containers[0]["env"][1]["name"], "HTTP_PROXY");
    assert_eq!(
        containers[0]["env"][1]["value"],
        "http://corporate-proxy:3128"
    );
    assert!(containers[1].get("env").is_none());
    let template = &doc["spec"]["template"]["metadata"];
    assert_eq!(template["labels"]["outrider.dev/meshed"], "true");
    let annotations = &template["annotations"];
    assert_eq!(annotations["prometheus.io/scrape"], "true");
    assert_eq!(annotations["prometheus.io/port"], "15000");
    assert_eq!(
        annotations["kubectl.kubernetes.io/default-container"],
        "app"
    );
    assert_eq!(annotations["outrider.dev/injected-traffic"], "capture");
    assert_eq!(annotations["outrider.dev/injected-sidecar"], "native");
    assert_eq!(
        annotations["outrider.dev/injected-version"],
        env!("CARGO_PKG_VERSION")
    );
}

#[test]
fn capture_false_keeps_the_http_proxy_mode_and_the_apps_own_proxy() {
    let file = fixture("deployment.yaml");
    let out = inject(&["--capture=false", file.to_str().unwrap()], "");
    let text = stdout_ok(&out);
    assert_eq!(
        stderr_of(&out),
        "outriderctl: warning: Deployment/checkout container app keeps its own \
         HTTP_PROXY=http://corporate-proxy:3128: its plain-HTTP calls go there, not through the \
         mesh (capture, the default, meshes them)\n"
    );
    golden(
        &golden_path("deployment.explicit.yaml"),
        &text,
        &["--capture=false"],
    );
    let doc: Value = serde_saphyr::from_str(&text).unwrap();
    let spec = &doc["spec"]["template"]["spec"];
    assert_eq!(names(&spec["initContainers"]), ["outrider-proxy"]);
    let env = |i: usize| -> Vec<(String, String)> {
        spec["containers"][i]["env"]
            .as_sequence()
            .unwrap()
            .iter()
            .map(|e| {
                (
                    e["name"].as_str().unwrap().to_string(),
                    e["value"].as_str().unwrap().to_string(),
                )
            })
            .collect()
    };
    let pairs = |list: &[(&str, &str)]| -> Vec<(String, String)> {
        list.iter()
            .map(|(n, v)| (n.to_string(), v.to_string()))
            .collect()
    };
    assert_eq!(
        env(0),
        pairs(&[
            ("LOG_LEVEL", "info"),
            ("HTTP_PROXY", "http://corporate-proxy:3128"),
            ("NO_PROXY", "127.0.0.1,localhost,::1"),
            ("no_proxy", "127.0.0.1,localhost,::1"),
        ])
    );
    assert_eq!(
        env(1),
        pairs(&[
            ("HTTP_PROXY", "http://127.0.0.1:15001"),
            ("http_proxy", "http://127.0.0.1:15001"),
            ("NO_PROXY", "127.0.0.1,localhost,::1"),
            ("no_proxy", "127.0.0.1,localhost,::1"),
        ])
    );
    assert_eq!(
        doc["spec"]["template"]["metadata"]["annotations"]["outrider.dev/injected-traffic"],
        "explicit"
    );

    // The env twin says the same; and injecting with capture takes back what explicit set.
    let mut child = Command::new(env!("CARGO_BIN_EXE_outriderctl"));
    child
        .args(["inject", file.to_str().unwrap()])
        .env("OUTRIDER_INJECT_CAPTURE", "false");
    assert_eq!(stdout_ok(&child.output().unwrap()), text);
    let captured = stdout_ok(&inject(&[], &text));
    let expected = std::fs::read_to_string(golden_path("deployment.native.yaml")).unwrap();
    assert_eq!(captured, expected);
}

#[test]
fn legacy_sidecar_is_a_container_that_holds_the_app_until_ready() {
    let file = fixture("deployment.yaml");
    let out = stdout_ok(&inject(&["--legacy", file.to_str().unwrap()], ""));
    golden(&golden_path("deployment.legacy.yaml"), &out, &["--legacy"]);
    let doc: Value = serde_saphyr::from_str(&out).unwrap();
    let spec = &doc["spec"]["template"]["spec"];
    assert_eq!(names(&spec["initContainers"]), ["outrider-init"]);
    assert_eq!(
        names(&spec["containers"]),
        ["outrider-proxy", "app", "worker"]
    );
    // `kubectl logs` without -c shows the app, not the proxy in front of it.
    assert_eq!(
        doc["spec"]["template"]["metadata"]["annotations"]
            ["kubectl.kubernetes.io/default-container"],
        "app"
    );
    let first = &spec["containers"][0];
    assert_eq!(first["name"], "outrider-proxy");
    assert!(first.get("restartPolicy").is_none());
    let hook = &first["lifecycle"]["postStart"]["exec"]["command"];
    assert_eq!(hook[0], "/usr/local/bin/outriderctl");
    assert_eq!(hook[1], "wait-ready");

    // Switching back to native moves the sidecar instead of adding a second one.
    let native = stdout_ok(&inject(&[], &out));
    let expected = std::fs::read_to_string(golden_path("deployment.native.yaml")).unwrap();
    assert_eq!(native, expected);
}

/// The pod spec of an injected document of any kind.
fn pod_spec(doc: &Value) -> Value {
    match doc["kind"].as_str().unwrap() {
        "Pod" => doc["spec"].clone(),
        "CronJob" => doc["spec"]["jobTemplate"]["spec"]["template"]["spec"].clone(),
        "List" => doc["items"][0]["spec"]["template"]["spec"].clone(),
        _ => doc["spec"]["template"]["spec"].clone(),
    }
}

/// Documents of a multi-document output, parsed.
fn documents(text: &str) -> Vec<Value> {
    text.split("\n---\n")
        .map(|d| serde_saphyr::from_str(d).unwrap())
        .collect()
}

#[test]
fn every_workload_kind_from_stdin_with_policy_env_and_annotations() {
    let text = std::fs::read_to_string(fixture("mixed.yaml")).unwrap();
    let policy = fixture("policy.yaml");
    let args = ["--policy", policy.to_str().unwrap()];
    // No file: standard input. `-`: standard input too; both give the same.
    let run = inject(&args, &text);
    let out = stdout_ok(&run);
    let dash = stdout_ok(&inject(&[args[0], args[1], "-"], &text));
    assert_eq!(out, dash);
    golden(&golden_path("mixed.yaml"), &out, &args);
    // The hostNetwork DaemonSet is the one warning.
    assert_eq!(
        stderr_of(&run),
        "outriderctl: warning: DaemonSet/node-exporter: not injected: hostNetwork pods share \
         the node's network namespace\n"
    );

    // Passed through byte for byte: the Service (with its comment), the ConfigMap, the
    // opted-out Deployment and the hostNetwork DaemonSet.
    let input_docs: Vec<&str> = text.split("\n---\n").collect();
    let output_docs: Vec<&str> = out.split("\n---\n").collect();
    assert_eq!(input_docs.len(), output_docs.len());
    for i in 0..4 {
        assert_eq!(input_docs[i], output_docs[i], "document {i} changed");
    }

    let docs = documents(&out);
    for doc in &docs[4..] {
        let spec = pod_spec(doc);
        assert_eq!(
            names(&spec["initContainers"])[..2],
            ["outrider-init", "outrider-proxy"],
            "{:?}",
            doc["kind"]
        );
        let env = spec["containers"][0]["env"].as_sequence().unwrap();
        let var = |name: &str| {
            env.iter()
                .find(|e| e["name"] == name)
                .map(|e| e["value"].as_str().unwrap().to_string())
        };
        // Services with a listen port get an address; the wildcard becomes loopback; a
        // service without one gets nothing. With capture, no HTTP_PROXY.
        assert_eq!(var("PAYMENTS_ADDR").as_deref(), Some("127.0.0.1:9001"));
        assert_eq!(var("LEDGER_V2_ADDR").as_deref(), Some("127.0.0.1:9002"));
        assert_eq!(var("REVIEWS_ADDR"), None);
        assert_eq!(var("HTTP_PROXY"), None);
        // Native sidecars end with their pod: no shutdown endpoint, even for Jobs.
        assert_eq!(var("OUTRIDER_SHUTDOWN_URL"), None);
        let sidecar_args = spec["initContainers"][1]["args"].as_sequence().unwrap();
        assert!(!sidecar_args.iter().any(|a| a == "--shutdown-endpoint"));
    }

    // The StatefulSet's annotations override resources and drain, and the grace period grows
    // to cover the drain; its own init container stays, after the sidecar.
    let ledger = pod_spec(&docs[4]);
    let sidecar = &ledger["initContainers"][1];
    assert_eq!(sidecar["resources"]["requests"]["cpu"], "250m");
    assert_eq!(sidecar["resources"]["requests"]["memory"], "256Mi");
    assert_eq!(sidecar["resources"]["limits"]["memory"], "256Mi");
    let args = sidecar["args"].as_sequence().unwrap();
    let drain = args.iter().position(|a| a == "--drain-timeout").unwrap();
    assert_eq!(args[drain + 1], "90s");
    assert_eq!(ledger["terminationGracePeriodSeconds"], 95);
    assert_eq!(ledger["initContainers"][2]["name"], "migrate");

    // The Job's workload annotation names the subscription.
    let job = pod_spec(&docs[6]);
    let args = job["initContainers"][1]["args"].as_sequence().unwrap();
    assert_eq!(args[0], "--workload");
    assert_eq!(args[1], "reporting");
}

#[test]
fn legacy_jobs_and_cronjobs_get_the_shutdown_endpoint() {
    let file = fixture("mixed.yaml");
    let args = ["--legacy", file.to_str().unwrap()];
    let run = inject(&args, "");
    let out = stdout_ok(&run);
    golden(&golden_path("mixed.legacy.yaml"), &out, &["--legacy"]);
    // The StatefulSet's migrate init container runs before a legacy sidecar: said once.
    let stderr = stderr_of(&run);
    assert!(
        stderr.contains("StatefulSet/ledger: its init containers run before the legacy sidecar"),
        "{stderr}"
    );
    assert_eq!(stderr.lines().count(), 2, "{stderr}");

    let docs = documents(&out);
    let mut finishing = Vec::new();
    for doc in &docs[4..] {
        let spec = pod_spec(doc);
        let sidecar = &spec["containers"][0];
        assert_eq!(sidecar["name"], "outrider-proxy");
        let endpoint = sidecar["args"]
            .as_sequence()
            .unwrap()
            .iter()
            .any(|a| a == "--shutdown-endpoint");
        let app_env = spec["containers"][1]["env"].as_sequence();
        let url = app_env
            .and_then(|env| env.iter().find(|e| e["name"] == "OUTRIDER_SHUTDOWN_URL"))
            .map(|e| e["value"].as_str().unwrap().to_string());
        assert_eq!(url.is_some(), endpoint, "{:?}", doc["kind"]);
        if endpoint {
            assert_eq!(url.as_deref(), Some("http://127.0.0.1:15000/shutdown"));
            finishing.push(doc["kind"].as_str().unwrap().to_string());
        }
    }
    assert_eq!(finishing, ["Job", "CronJob"]);
}

#[test]
fn a_bad_skip_annotation_is_refused_before_anything_is_written() {
    let pod = "apiVersion: v1\nkind: Pod\nmetadata:\n  name: p\n  annotations:\n    outrider.dev/skip-outbound-cidrs: 10.1.2.3/8\nspec:\n  containers: [{ name: a, image: a }]\n";
    let out = inject(&[], pod);
    assert_eq!(out.status.code(), Some(64));
    assert_eq!(out.stdout, b"");
    assert_eq!(
        stderr_of(&out),
        "outriderctl: Pod/p: outrider.dev/skip-outbound-cidrs `10.1.2.3/8`: `10.1.2.3/8` has \
         host bits set after its prefix\n"
    );
    // Without capture the annotation is unused, but a typo is still a typo.
    let out = inject(&["--capture=false"], pod);
    assert_eq!(out.status.code(), Some(64));
}

#[test]
fn several_files_are_joined_as_documents() {
    let a = fixture("deployment.yaml");
    let b = fixture("mixed.yaml");
    let both = stdout_ok(&inject(
        &["-f", a.to_str().unwrap(), b.to_str().unwrap()],
        "",
    ));
    let first = stdout_ok(&inject(&[a.to_str().unwrap()], ""));
    let second = stdout_ok(&inject(&[b.to_str().unwrap()], ""));
    assert_eq!(both, format!("{first}---\n{second}"));
}

#[test]
fn bad_input_is_refused_with_its_reason() {
    let bad_annotation = "apiVersion: v1\nkind: Pod\nmetadata:\n  name: p\n  annotations:\n    outrider.dev/drain-timeout: \"30\"\nspec:\n  containers: [{ name: a, image: a }]\n";
    let out = inject(&[], bad_annotation);
    assert_eq!(out.status.code(), Some(64));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("Pod/p: outrider.dev/drain-timeout `30` is not a duration"),
        "{stderr}"
    );

    let out = inject(&["--proxy-memory", "lots"], bad_annotation);
    assert_eq!(out.status.code(), Some(64));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--proxy-memory `lots`"));

    let out = inject(&[], "kind: Pod\nspec: [unclosed\n");
    assert_eq!(out.status.code(), Some(65));
    assert!(String::from_utf8_lossy(&out.stderr).contains("<stdin>: document 1"));

    let out = inject(&["/nonexistent/manifest.yaml"], "");
    assert_eq!(out.status.code(), Some(66));

    // An invalid policy is reported with its position, as `validate` does.
    let dir = std::env::temp_dir().join(format!("outrider-inject-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let policy = dir.join("policy.yaml");
    std::fs::write(&policy, "services:\n  a:\n    endpoint: [127.0.0.1:1]\n").unwrap();
    let out = inject(&["--policy", policy.to_str().unwrap()], bad_annotation);
    assert_eq!(out.status.code(), Some(64));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(&format!("{}:3:5", policy.display())),
        "{stderr}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn opted_out_and_non_workloads_are_identical_bytes() {
    let text = "# just a comment\n---\napiVersion: v1\nkind: Secret   # odd spacing kept\nmetadata: {name: s}\nstringData: {token: x}\n";
    assert_eq!(stdout_ok(&inject(&[], text)), text);
}

#[test]
fn kubernetes_example_app_is_the_injected_source() {
    // The README's command, run the way the README shows it (from the workspace root).
    let workspace = root().parent().unwrap().to_path_buf();
    let out = Command::new(env!("CARGO_BIN_EXE_outriderctl"))
        .current_dir(&workspace)
        .args([
            "inject",
            "-f",
            "deploy/examples/kubernetes-app.yaml",
            "--policy",
            "deploy/kubernetes/policies/checkout.yaml",
        ])
        .output()
        .unwrap();
    let generated = stdout_ok(&out);
    let committed =
        std::fs::read_to_string(workspace.join("deploy/kubernetes/example-app.yaml")).unwrap();
    assert_eq!(
        generated, committed,
        "deploy/kubernetes/example-app.yaml is stale: regenerate it with the command in deploy/examples/kubernetes-app.yaml"
    );
    assert!(generated.contains("- name: REVIEWS_ADDR\n          value: 127.0.0.1:9002"));
}
