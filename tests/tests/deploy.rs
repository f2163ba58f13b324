//! The Kubernetes example, run for real without a cluster: the shipped policy documents
//! (deploy/kubernetes/policies) served by the real `outrider-control`, and a real
//! `outrider-proxy` started with exactly the command line `outriderctl inject` wrote into
//! deploy/kubernetes/example-app.yaml. Only what a pod provides differs: the control-plane URL,
//! the token and state paths, the pod's name, namespace and service account and its projected
//! service-account token (minted by a stand-in issuer whose keys the control plane trusts), the
//! admin address (port 0 here, as every listener), and the services' cluster DNS names and
//! fixed ports, replaced by local upstreams and port 0. The capture init container's netfilter
//! rules are not installed here (they need a pod network namespace of their own; see
//! capture_init.rs): the proxy serves explicit traffic on loopback, as it does beside them.

#![allow(clippy::unwrap_used, missing_docs)]

use std::path::PathBuf;
use std::time::{Duration, Instant};

use outrider_e2e::service_account::TokenIssuer;
use outrider_e2e::*;

fn workspace() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

/// The parts of a Kubernetes manifest the sidecar is found by; everything else is ignored.
#[derive(serde::Deserialize)]
struct Manifest {
    kind: String,
    spec: Option<WorkloadSpec>,
}

#[derive(serde::Deserialize)]
struct WorkloadSpec {
    template: Option<PodTemplate>,
}

#[derive(serde::Deserialize)]
struct PodTemplate {
    spec: PodSpec,
}

#[derive(serde::Deserialize)]
struct PodSpec {
    #[serde(rename = "initContainers", default)]
    init_containers: Vec<Container>,
}

#[derive(serde::Deserialize)]
struct Container {
    name: String,
    command: Vec<String>,
    args: Vec<String>,
    #[serde(rename = "securityContext")]
    security_context: SecurityContext,
}

#[derive(serde::Deserialize)]
struct SecurityContext {
    #[serde(rename = "runAsUser")]
    run_as_user: u32,
}

/// The pod template's init containers of the Deployment in `text` (multi-document YAML).
fn deployment_init_containers(text: &str) -> Vec<Container> {
    let deployment = text
        .split("\n---\n")
        .map(|doc| serde_saphyr::from_str::<Manifest>(doc).unwrap())
        .find(|doc| doc.kind == "Deployment")
        .unwrap();
    deployment
        .spec
        .unwrap()
        .template
        .unwrap()
        .spec
        .init_containers
}

/// The injected proxy container of the example Deployment: its command and args.
fn injected_sidecar() -> Vec<String> {
    let text =
        std::fs::read_to_string(workspace().join("deploy/kubernetes/example-app.yaml")).unwrap();
    // The proxy's container by name: with capture, the init container that installs the
    // netfilter rules comes first. Its rules are what a pod adds around the proxy; here the
    // proxy runs without them, on loopback, with the command line it has in the pod.
    let init_containers = deployment_init_containers(&text);
    let names: Vec<&str> = init_containers.iter().map(|c| c.name.as_str()).collect();
    assert_eq!(names, ["outrider-init", "outrider-proxy"]);
    let sidecar = &init_containers[1];
    let mut line = sidecar.command.clone();
    line.extend(sidecar.args.iter().cloned());
    line
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_injected_sidecar_subscribes_to_the_control_plane_and_routes_by_the_shipped_policy() {
    let payments = Upstream::echo(Proto::Http1, "payments").await;
    let reviews = Upstream::echo(Proto::Http1, "reviews").await;

    // The ConfigMap's documents, with cluster addresses made local.
    let dirs = ControlDirs::new();
    for (name, replacements) in [
        (
            "defaults.yaml",
            vec![(
                "dns: payments.outrider.svc.cluster.local:8080".to_string(),
                format!("endpoints: [{}]", payments.addr),
            )],
        ),
        (
            "checkout.yaml",
            vec![
                (
                    "dns: reviews.outrider.svc.cluster.local:8080".to_string(),
                    format!("endpoints: [{}]", reviews.addr),
                ),
                (
                    "listen: 127.0.0.1:9002".to_string(),
                    "listen: 127.0.0.1:0".to_string(),
                ),
            ],
        ),
    ] {
        let mut text =
            std::fs::read_to_string(workspace().join("deploy/kubernetes/policies").join(name))
                .unwrap();
        for (from, to) in replacements {
            assert!(text.contains(&from), "{name} no longer has `{from}`");
            text = text.replace(&from, &to);
        }
        dirs.write(name, &text);
    }
    // The control plane binds certificates to service accounts, as the sidecar's projected
    // token volume expects.
    let issuer = TokenIssuer::new();
    let flags = issuer.control_flags();
    let control = start_control_with(&dirs, &flags.each_ref().map(String::as_str));

    // The injected command line, with the pod's parts made local.
    let state = TempDir::new();
    let line = injected_sidecar();
    assert!(line[0].ends_with("/outrider-proxy"), "{line:?}");
    let mut args: Vec<std::ffi::OsString> = Vec::new();
    let mut words = line[1..].iter();
    while let Some(flag) = words.next() {
        let value = words
            .next()
            .unwrap_or_else(|| panic!("{flag} has no value"));
        let value: std::ffi::OsString = match flag.as_str() {
            "--control" => {
                assert_eq!(
                    value,
                    "http://outrider-control.outrider.svc.cluster.local:15010"
                );
                control.url().into()
            }
            "--token-file" => dirs.token_file.clone().into(),
            "--state-dir" => state.path.clone().into(),
            "--proxy-id" => {
                assert_eq!(value, "$(POD_NAME)");
                "checkout-5d9f7-x2k4q".into()
            }
            "--namespace" => {
                assert_eq!(value, "$(POD_NAMESPACE)");
                "outrider".into()
            }
            // With --sa-jwks a pod subscribes only as the workload named like its service
            // account, so the pod runs as `checkout` (README: Service-account binding).
            "--service-account" => {
                assert_eq!(value, "$(POD_SERVICE_ACCOUNT)");
                "checkout".into()
            }
            "--identity-token-file" => {
                assert_eq!(value, "/var/run/outrider/identity/token");
                issuer.token_file("outrider", "checkout", "outrider", 3600)
            }
            // The harness binds every listener on 127.0.0.1:0.
            "--admin" => continue,
            _ => value.into(),
        };
        args.push(flag.into());
        args.push(value);
    }
    let proxy = spawn_proxy(TempDir::new(), &args);

    // Ready once the control plane's merged policy for `checkout` is applied.
    let started = Instant::now();
    while proxy.admin_get("/ready").await.0 != 200 {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "sidecar never ready; logs:\n{}",
            proxy.logs().join("\n")
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (_, body) = proxy.admin_get("/config").await;
    let config: serde_json::Value = serde_json::from_str(&body).unwrap();
    let services = config["policy"]["services"].as_object().unwrap();
    assert!(services.contains_key("payments") && services.contains_key("reviews"));
    // Ready also means certified, as the pod's own service account.
    let (_, identity) = proxy.admin_get("/identity").await;
    let identity: serde_json::Value = serde_json::from_str(&identity).unwrap();
    assert_eq!(
        identity["identity"],
        "spiffe://cluster.local/ns/outrider/sa/checkout"
    );

    // The defaults' route and the workload's dedicated port both work through the sidecar.
    let reply = get(proxy.outbound, "payments", "/charge").await;
    assert_eq!(reply.status, 200);
    assert_eq!(reply.json()["server"], "payments");
    // The dedicated port came with the control plane's policy, after start: find it in the log.
    let reviews_port: std::net::SocketAddr = proxy
        .logs()
        .iter()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .find(|e| e["message"] == "service listener bound" && e["service"] == "reviews")
        .map(|e| e["listen"].as_str().unwrap().parse().unwrap())
        .expect("no dedicated listener for reviews");
    let reply = get(reviews_port, "anything", "/r").await;
    assert_eq!(reply.status, 200);
    assert_eq!(reply.json()["server"], "reviews");
}

/// The capture init container as `outriderctl inject` writes it, its exact command line run by
/// the real `outrider-proxy` with `--mode nft --dry-run` added (the rules rendered, the kernel
/// untouched): `init` accepts every flag inject writes, the skip annotations arrive as rules,
/// and the uid the rules exempt is the one the proxy container runs as.
#[test]
fn the_injected_init_container_renders_rules_that_exempt_the_proxy_container() {
    let source =
        std::fs::read_to_string(workspace().join("deploy/examples/kubernetes-app.yaml")).unwrap();
    let drain = "        outrider.dev/drain-timeout: 20s\n";
    assert!(source.contains(drain), "the example's annotations moved");
    let annotated = source.replace(
        drain,
        &format!(
            "{drain}        outrider.dev/skip-inbound-ports: \"22, 9000-9100\"\n        \
             outrider.dev/skip-outbound-cidrs: 10.0.0.0/8,2001:db8::/32\n"
        ),
    );
    let mut inject = std::process::Command::new(ctl_binary())
        .args(["inject", "-"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::io::Write::write_all(&mut inject.stdin.take().unwrap(), annotated.as_bytes()).unwrap();
    let injected = inject.wait_with_output().unwrap();
    assert!(
        injected.status.success(),
        "{}",
        String::from_utf8_lossy(&injected.stderr)
    );
    let init_containers = deployment_init_containers(&String::from_utf8(injected.stdout).unwrap());
    let names: Vec<&str> = init_containers.iter().map(|c| c.name.as_str()).collect();
    assert_eq!(names, ["outrider-init", "outrider-proxy"]);
    let (init, proxy) = (&init_containers[0], &init_containers[1]);
    assert_eq!(init.security_context.run_as_user, 0);
    assert!(
        init.command[0].ends_with("/outrider-proxy"),
        "{:?}",
        init.command
    );

    let rules = std::process::Command::new(proxy_binary())
        .args(&init.command[1..])
        .args(&init.args)
        .args(["--mode", "nft", "--dry-run"])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&rules.stdout);
    assert!(
        rules.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&rules.stderr)
    );
    for rule in [
        format!("meta skuid {} return", proxy.security_context.run_as_user),
        "tcp dport 15000 return".to_string(),
        "tcp dport 22 return".to_string(),
        "tcp dport 9000-9100 return".to_string(),
        "ip daddr 10.0.0.0/8 return".to_string(),
        "ip6 daddr 2001:db8::/32 return".to_string(),
        "meta l4proto tcp redirect to :15006".to_string(),
        "meta l4proto tcp redirect to :15001".to_string(),
    ] {
        assert!(stdout.contains(&rule), "no `{rule}` in:\n{stdout}");
    }
}
