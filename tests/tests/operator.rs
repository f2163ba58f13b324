//! An operator's day with `outriderctl`, end to end: the real `outrider-control`, real
//! `outrider-proxy` processes and the real CLI on 127.0.0.1. `check` names a misspelt
//! `--workload` within seconds of the proxy starting; `apply --wait` fails naming the proxy
//! that NACKed and why, or did not answer; an applied document does not silently lose to the
//! next edit of its file; `-o json` is golden (times, hashes and addresses normalized); every
//! verb's exit code is asserted.

#![allow(clippy::unwrap_used, missing_docs)]

use std::io::Write as _;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use outrider_config::wire::ServerMessage;
use outrider_e2e::*;

/// A push reaching a subscriber on a loaded 2-core machine.
const PUSH_BOUND: Duration = Duration::from_secs(2);

/// Runs `outriderctl ARGS` off the async threads (`apply --wait` polls for seconds).
async fn ctl(control: &Control, args: &[&str]) -> Output {
    let url = control.url();
    let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
    tokio::task::spawn_blocking(move || {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        outrider_e2e::control::ctl(&url, Some(CONTROL_TOKEN), &args)
    })
    .await
    .unwrap()
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn code(out: &Output) -> i32 {
    out.status.code().unwrap_or(-1)
}

/// A proxy subscribed to `control` as `workload`, with id `id`.
fn proxy_as(control: &Control, dirs: &ControlDirs, workload: &str, id: &str) -> Proxy {
    let mut args = control.proxy_flags(dirs, workload);
    args.extend(["--proxy-id".into(), id.into()]);
    spawn_proxy(TempDir::new(), &args)
}

/// Waits until the control plane reports proxy `id` in `state`.
async fn wait_state(control: &Control, id: &str, state: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let status = control.status().await;
        let p = status["proxies"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["proxy"] == id)
            .cloned();
        if p.as_ref().is_some_and(|p| p["state"] == state) {
            return;
        }
        assert!(Instant::now() < deadline, "{id} never {state}: {p:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// `check`'s text with what changes from run to run replaced: the URL, the server's version
/// and the measured clock skew.
fn normalize_check(text: &str, url: &str) -> String {
    text.lines()
        .map(|line| {
            let line = line.replace(url, "<url>");
            let line = line.replace(
                &format!("outrider-control {}", env!("CARGO_PKG_VERSION")),
                "outrider-control <version>",
            );
            match line.find("clock skew ") {
                Some(at) => format!("{}clock skew <s>", &line[..at]),
                None => line,
            }
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// A JSON document with times, hashes, merged YAML, addresses and paths replaced, for golden
/// comparison.
fn normalize_json(value: &mut serde_json::Value, url: &str, state: &Path) {
    match value {
        serde_json::Value::Object(map) => {
            for (key, v) in map.iter_mut() {
                // Times, and the skew (an i64), vary from run to run.
                if key.ends_with("_ms") && (v.is_u64() || v.is_i64()) {
                    *v = 0.into();
                } else if key == "content_hash" && v.is_string() {
                    *v = "<hash>".into();
                } else if key == "policy" && v.is_string() {
                    // The merged YAML spells out every default: asserted on its own.
                    *v = "<merged policy>".into();
                } else if key == "version" && v.is_string() {
                    *v = "<version>".into();
                } else {
                    normalize_json(v, url, state);
                }
            }
        }
        serde_json::Value::Array(items) => {
            for v in items {
                normalize_json(v, url, state);
            }
        }
        serde_json::Value::String(s) => {
            *s = s
                .replace(url, "<url>")
                .replace(&state.display().to_string(), "<state>");
        }
        _ => {}
    }
}

/// Asserts `out`'s stdout is the JSON `expected` once normalized (field order aside).
fn assert_golden_json(out: &Output, url: &str, state: &Path, expected: &str) {
    let mut value: serde_json::Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("not JSON ({e}): {}", stdout(out)));
    normalize_json(&mut value, url, state);
    let expected: serde_json::Value = serde_json::from_str(expected).unwrap();
    assert_eq!(
        value,
        expected,
        "got:\n{}",
        serde_json::to_string_pretty(&value).unwrap()
    );
}

const DEFAULTS: &str = "workload: \"*\"\nservices:\n  payments: { endpoints: [127.0.0.1:9101] }\n";
const SHOP: &str = "workload: shop\nservices:\n  cart: { endpoints: [127.0.0.1:9201] }\nroutes:\n  - { match: { authority: cart }, service: cart }\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_names_a_misspelt_workload_within_seconds_of_the_proxy_starting() {
    let dirs = ControlDirs::new();
    dirs.write("defaults.yaml", DEFAULTS);
    dirs.write("shop.yaml", SHOP);
    let control = start_control(&dirs);
    let started = Instant::now();
    let proxy = proxy_as(&control, &dirs, "shpo", "pod-typo");
    let found = loop {
        let out = ctl(&control, &["check"]).await;
        if stdout(&out).contains("[workload-unnamed]")
            && stdout(&out).contains("1 proxy connected, 1 in sync")
        {
            break out;
        }
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "check did not flag the typo: {}{}",
            stdout(&out),
            stderr(&out)
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let took = started.elapsed();
    eprintln!("proxy start -> check flags the misspelt workload: {took:?}");
    assert_eq!(code(&found), 2, "warnings only: {}", stderr(&found));
    let url = control.url();
    assert_eq!(
        normalize_check(&stdout(&found), &url),
        "ok control plane <url> reachable: outrider-control <version>, version in force 1, clock skew <s>
ok 1 proxy connected, 1 in sync
warning [workload-unnamed] shpo: proxy pod-typo subscribes as workload `shpo`, which no document names: it runs only the defaults (did you mean `shop`?)
    fix: start the proxy with --workload shop, or name `shpo` in a document if it needs a policy of its own
warning [document-unused] shop.yaml: names workload `shop` but no connected proxy runs it (did you mean `shpo` for `shop`?)
    fix: correct the workload name in the document, or ignore this until those workloads are deployed
0 errors, 2 warnings"
    );
    let json = ctl(&control, &["check", "-o", "json"]).await;
    assert_eq!(code(&json), 2);
    assert_golden_json(
        &json,
        &url,
        &dirs.state,
        r#"{
  "control_plane": {
    "url": "<url>",
    "version": "<version>",
    "version_in_force": 1,
    "clock_skew_ms": 0
  },
  "proxies_connected": 1,
  "proxies_in_sync": 1,
  "findings": [
    {
      "severity": "warning",
      "check": "workload-unnamed",
      "subject": "shpo",
      "message": "proxy pod-typo subscribes as workload `shpo`, which no document names: it runs only the defaults (did you mean `shop`?)",
      "fix": "start the proxy with --workload shop, or name `shpo` in a document if it needs a policy of its own"
    },
    {
      "severity": "warning",
      "check": "document-unused",
      "subject": "shop.yaml",
      "message": "names workload `shop` but no connected proxy runs it (did you mean `shpo` for `shop`?)",
      "fix": "correct the workload name in the document, or ignore this until those workloads are deployed"
    }
  ],
  "errors": 0,
  "warnings": 2
}"#,
    );

    // The proxy says so itself: in /ready (still ready: the defaults may be all it needs)
    // and in its log.
    let (status, ready) = proxy.admin_get("/ready").await;
    assert_eq!(status, 200);
    assert!(ready.contains("workload_named=false"), "{ready}");
    assert!(
        proxy
            .logs()
            .iter()
            .any(|l| l.contains("no policy document names this workload")),
        "{}",
        proxy.logs().join("\n")
    );

    // A document naming `shpo` (same merged policy) clears it on the proxy too.
    let file = dirs.policies.parent().unwrap().join("shpo.yaml");
    std::fs::write(&file, "workload: shpo\n").unwrap();
    let out = ctl(&control, &["apply", "-f", file.to_str().unwrap()]).await;
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    assert!(
        eventually(PUSH_BOUND, || ready_without_the_note(&proxy)).await,
        "/ready still says workload_named=false"
    );
    let out = ctl(&control, &["check"]).await;
    assert!(
        !stdout(&out).contains("[workload-unnamed]"),
        "{}",
        stdout(&out)
    );
}

/// Whether the proxy's `/ready` no longer says its workload is unnamed (blocking look, for
/// `eventually`).
fn ready_without_the_note(proxy: &Proxy) -> bool {
    let addr = proxy.admin;
    let answer = std::thread::spawn(move || {
        use std::io::Read as _;
        let Ok(mut s) = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(1)) else {
            return String::new();
        };
        let _ = s.set_read_timeout(Some(Duration::from_secs(1)));
        let _ = s.write_all(b"GET /ready HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n");
        let mut body = String::new();
        let _ = s.read_to_string(&mut body);
        body
    })
    .join()
    .unwrap_or_default();
    answer.contains("HTTP/1.1 200") && !answer.contains("workload_named=false")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn apply_wait_names_the_proxy_that_nacked_and_why_or_did_not_answer() {
    let a = Upstream::echo(Proto::Http1, "a").await;
    let dirs = ControlDirs::new();
    dirs.write(
        "defaults.yaml",
        &format!(
            "workload: \"*\"\nservices:\n  a: {{ endpoints: [{}] }}\n",
            a.addr
        ),
    );
    let control = start_control(&dirs);
    let _proxy = proxy_as(&control, &dirs, "checkout", "pod-1");
    wait_state(&control, "pod-1", "in-sync").await;
    let docs = TempDir::new();

    // A policy the proxy can apply: --wait reports its ACK and exits 0.
    let good = docs.path.join("checkout.yaml");
    std::fs::write(
        &good,
        format!(
            "workload: checkout\nservices:\n  b: {{ endpoints: [{}] }}\n",
            a.addr
        ),
    )
    .unwrap();
    let out = ctl(
        &control,
        &["apply", "--wait=10s", "-f", good.to_str().unwrap()],
    )
    .await;
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    assert!(
        stderr(&out).contains("pod-1 (checkout) ACKed version 2"),
        "{}",
        stderr(&out)
    );

    // A dedicated listener on a port taken here: valid for the control plane, impossible for
    // the proxy, which NACKs. --wait exits 4 with the proxy and its reason.
    let holder = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let taken = holder.local_addr().unwrap();
    std::fs::write(
        &good,
        format!(
            "workload: checkout\nservices:\n  b: {{ endpoints: [{}], listen: {taken} }}\n",
            a.addr
        ),
    )
    .unwrap();
    let out = ctl(
        &control,
        &["apply", "--wait=10s", "-f", good.to_str().unwrap()],
    )
    .await;
    let err = stderr(&out);
    assert_eq!(code(&out), 4, "{err}");
    assert!(
        err.contains(&format!(
            "  pod-1 (checkout) NACKed version 3: cannot listen on {taken} for service `b`"
        )),
        "{err}"
    );
    assert!(
        err.contains("outriderctl: applied, but 1 of 1 proxies did not apply it"),
        "{err}"
    );
    // check calls it an error, with the reason.
    let out = ctl(&control, &["check"]).await;
    assert_eq!(code(&out), 1, "{}", stdout(&out));
    assert!(
        stdout(&out).contains(&format!("error [proxy-nack] pod-1: refused version 3 of workload `checkout` and keeps an older policy: cannot listen on {taken} for service `b`")),
        "{}",
        stdout(&out)
    );

    // A subscriber that never answers: --wait gives up at its timeout and names it.
    let _silent = control.subscribe("checkout", "pod-silent", false).await;
    drop(holder);
    std::fs::write(
        &good,
        format!(
            "workload: checkout\nservices:\n  c: {{ endpoints: [{}] }}\n",
            a.addr
        ),
    )
    .unwrap();
    let began = Instant::now();
    let out = ctl(
        &control,
        &["apply", "--wait=1s", "-f", good.to_str().unwrap()],
    )
    .await;
    let err = stderr(&out);
    assert_eq!(code(&out), 4, "{err}");
    assert!(err.contains("pod-1 (checkout) ACKed version 4"), "{err}");
    assert!(
        err.contains("  pod-silent (checkout) did not answer within 1s"),
        "{err}"
    );
    assert!(
        began.elapsed() < Duration::from_secs(5),
        "{:?}",
        began.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_applied_override_of_a_watched_file_is_refused_without_force_and_not_undone_by_its_next_edit(
) {
    let file_text = |port: u16| {
        format!("workload: \"*\"\nservices:\n  x: {{ endpoints: [127.0.0.1:{port}] }}\n")
    };
    let dirs = ControlDirs::new();
    dirs.write("d.yaml", &file_text(1));
    let control = start_control(&dirs);
    let mut sub = control.subscribe("w", "pod-1", false).await;
    let first = sub.next_update(PUSH_BOUND).await.unwrap();
    assert!(first.policy.contains("127.0.0.1:1"));

    let elsewhere = TempDir::new();
    let applied = elsewhere.path.join("d.yaml");
    std::fs::write(&applied, file_text(9)).unwrap();
    let out = ctl(&control, &["apply", "-f", applied.to_str().unwrap()]).await;
    assert_eq!(code(&out), 1, "{}", stdout(&out));
    assert!(
        stderr(&out).contains("d.yaml comes from the policy directory: edit the file, or apply with --force to override it"),
        "{}",
        stderr(&out)
    );
    let out = ctl(
        &control,
        &["apply", "--force", "-f", applied.to_str().unwrap()],
    )
    .await;
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    let overridden = sub.next_update(PUSH_BOUND).await.unwrap();
    assert!(overridden.policy.contains("127.0.0.1:9"));

    // The file's next edit does not undo the apply: nothing is pushed, status says so.
    dirs.write("d.yaml", &file_text(2));
    let quiet = Instant::now();
    while quiet.elapsed() < Duration::from_millis(1500) {
        match sub.next(Duration::from_millis(1500)).await {
            Some(ServerMessage::Heartbeat) => {}
            other => panic!("the file's edit must not be pushed, got {other:?}"),
        }
    }
    let status = control.status().await;
    let doc = status["documents"]
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["name"] == "d.yaml")
        .cloned()
        .unwrap();
    assert_eq!(doc["source"], "api");
    assert_eq!(doc["overrides_file"], true);
    assert_eq!(doc["file_differs"], true);
    let text = stdout(&ctl(&control, &["status"]).await);
    assert!(
        text.contains("applied documents overriding a policy file (`outriderctl delete NAME` hands one back to its file):\n  d.yaml (the file differs: its text is not in force)"),
        "{text}"
    );
    assert!(
        control.wait_log(Duration::from_secs(2), |l| l
            .contains("policy file overridden by an applied document")),
        "no warning logged"
    );
    let out = ctl(&control, &["check"]).await;
    assert_eq!(code(&out), 2);
    assert!(
        stdout(&out).contains("warning [document-overrides-file] d.yaml:"),
        "{}",
        stdout(&out)
    );

    // `delete` hands the document back to the file, at its current text; then the file rules.
    let out = ctl(&control, &["delete", "d.yaml"]).await;
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    let back = sub.next_update(PUSH_BOUND).await.unwrap();
    assert!(back.policy.contains("127.0.0.1:2"), "{}", back.policy);
    dirs.write("d.yaml", &file_text(3));
    let edited = sub.next_update(PUSH_BOUND).await.unwrap();
    assert!(edited.policy.contains("127.0.0.1:3"), "{}", edited.policy);
}

/// `outriderctl ARGS` with `stdin` piped in.
fn ctl_stdin(control: &Control, args: &[&str], stdin: &str) -> Output {
    let mut child = Command::new(ctl_binary())
        .args(args)
        .env("OUTRIDER_CONTROL_URL", control.url())
        .env("OUTRIDER_CONTROL_TOKEN", CONTROL_TOKEN)
        .env_remove("OUTRIDER_CONTROL_TOKEN_FILE")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(stdin.as_bytes())
        .unwrap();
    child.wait_with_output().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn read_commands_print_stable_json_and_every_verb_says_how_it_ended() {
    let dirs = ControlDirs::new();
    dirs.write(
        "a.yaml",
        "workload: checkout\nservices: { cart: { endpoints: [127.0.0.1:9201] } }\n",
    );
    // Named, so the replica's name in `status` is stable.
    let control = start_control_with(&dirs, &["--replica-name", "control-0"]);
    let url = control.url();
    let mut sub = control.subscribe("checkout", "pod-1", false).await;
    sub.next_update(PUSH_BOUND).await.unwrap();

    let status = ctl(&control, &["status", "-o", "json"]).await;
    assert_eq!(code(&status), 0);
    assert_golden_json(
        &status,
        &url,
        &dirs.state,
        r#"{
  "version": 1,
  "documents": [
    {
      "name": "a.yaml",
      "source": "file",
      "changed_at": 1,
      "rejected": null,
      "workloads": [
        "checkout"
      ],
      "overrides_file": false,
      "file_differs": false
    }
  ],
  "proxies": [
    {
      "proxy": "pod-1",
      "workload": "checkout",
      "connected": true,
      "connected_since_ms": 0,
      "version_sent": 1,
      "version_applied": null,
      "applied_at_ms": null,
      "last_nack": null,
      "state": "pending",
      "pending_since_ms": 0,
      "workload_named": true,
      "disconnected_at_ms": null,
      "replica": "control-0"
    }
  ],
  "store": {
    "dir": "<state>",
    "healthy": true,
    "error": null,
    "failing_since_ms": null,
    "write_failures": 0,
    "pending": null
  },
  "certificates": {
    "ca_not_after_ms": 0,
    "leaf_ttl_ms": 0,
    "issued": []
  },
  "now_ms": 0,
  "replica": {
    "name": "control-0",
    "leader": true,
    "replicated": false,
    "view_behind_ms": null,
    "view_stale": false,
    "other_replicas_error": null
  }
}"#,
    );
    let history = ctl(&control, &["history", "-o", "json"]).await;
    assert_golden_json(
        &history,
        &url,
        &dirs.state,
        r#"[
  {
    "version": 1,
    "at_ms": 0,
    "cause": "files changed: a.yaml",
    "documents": [
      "a.yaml"
    ]
  }
]"#,
    );
    let get = ctl(&control, &["get", "checkout", "-o", "json"]).await;
    assert_golden_json(
        &get,
        &url,
        &dirs.state,
        r#"{
  "workload": "checkout",
  "version": 1,
  "content_hash": "<hash>",
  "policy": "<merged policy>",
  "named": true,
  "running": true
}"#,
    );
    assert!(stdout(&get).contains("127.0.0.1:9201"), "{}", stdout(&get));
    let yaml = stdout(&ctl(&control, &["get", "checkout", "-o", "yaml"]).await);
    assert!(
        yaml.starts_with("workload: checkout\nversion: 1\n"),
        "{yaml}"
    );

    // A workload nobody runs and no document names: exit 1, and nothing is created for it.
    let out = ctl(&control, &["get", "nosuchworkload"]).await;
    assert_eq!(code(&out), 1);
    assert!(
        stderr(&out)
            .contains("no document names workload `nosuchworkload` and no connected proxy runs it"),
        "{}",
        stderr(&out)
    );

    let version = ctl(&control, &["version"]).await;
    assert_eq!(code(&version), 0);
    let v = env!("CARGO_PKG_VERSION");
    assert_eq!(
        stdout(&version),
        format!("client: outriderctl {v}\nserver: outrider-control {v} ({url})\n")
    );
    for (shell, marker, wait) in [
        ("bash", "_outriderctl()", "--wait"),
        ("zsh", "#compdef outriderctl", "--wait"),
        ("fish", "complete -c outriderctl", "-l wait"),
    ] {
        let out = ctl(&control, &["completion", shell]).await;
        assert_eq!(code(&out), 0);
        assert!(stdout(&out).contains(marker), "{shell}");
        assert!(stdout(&out).contains(wait), "{shell}");
    }

    // -f DIR: its *.yaml and *.yml, hidden files and others skipped; -f - needs --name.
    let dir = TempDir::new();
    let doc = |port: u16| {
        format!("workload: search\nservices: {{ s{port}: {{ endpoints: [127.0.0.1:{port}] }} }}\n")
    };
    std::fs::write(dir.path.join("b.yaml"), doc(1)).unwrap();
    std::fs::write(dir.path.join("c.yml"), doc(2)).unwrap();
    std::fs::write(dir.path.join(".hidden.yaml"), "not: [yaml").unwrap();
    std::fs::write(dir.path.join("notes.txt"), "x").unwrap();
    let out = ctl(
        &control,
        &["apply", "--wait=5s", "-f", dir.path.to_str().unwrap()],
    )
    .await;
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    // No proxy runs `search`: --wait has nothing to wait for.
    assert!(
        stderr(&out).contains("no connected proxy runs a changed workload: nothing to wait for"),
        "{}",
        stderr(&out)
    );
    let out = ctl_stdin(&control, &["apply", "-f", "-"], &doc(3));
    assert_eq!(code(&out), 64);
    assert!(
        stderr(&out).contains("-f -) needs --name"),
        "{}",
        stderr(&out)
    );
    let out = ctl_stdin(&control, &["apply", "-f", "-", "--name", "piped"], &doc(3));
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    let causes: Vec<String> = serde_json::from_slice::<serde_json::Value>(
        &ctl(&control, &["history", "-o", "json"]).await.stdout,
    )
    .unwrap()
    .as_array()
    .unwrap()
    .iter()
    .map(|h| h["cause"].as_str().unwrap().to_string())
    .collect();
    assert_eq!(
        causes,
        [
            "apply piped",
            "apply c.yml",
            "apply b.yaml",
            "files changed: a.yaml"
        ]
    );

    // A conflict is listed once, without its name twice, and leaves status once fixed.
    dirs.write(
        "conflict.yaml",
        "workload: checkout\nservices: { cart: { endpoints: [127.0.0.1:9301] } }\n",
    );
    let listed = "  conflict.yaml: service `cart` is defined for workload `checkout` by both `a.yaml` and `conflict.yaml`";
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let text = stdout(&ctl(&control, &["status"]).await);
        if text.contains(listed) {
            assert!(!text.contains("conflict.yaml: conflict.yaml:"), "{text}");
            break;
        }
        assert!(Instant::now() < deadline, "{text}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    dirs.write(
        "conflict.yaml",
        "workload: checkout\nservices: { other: { endpoints: [127.0.0.1:9301] } }\n",
    );
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let text = stdout(&ctl(&control, &["status"]).await);
        if !text.contains("rejected documents") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the fixed file's rejection stays: {text}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // A disconnected proxy leaves `status` (until --registry-expiry forgets it), not `--all`.
    drop(sub);
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let text = stdout(&ctl(&control, &["status"]).await);
        if text.contains("(1 disconnected proxy not shown: --all lists it)") {
            assert!(!text.contains("pod-1"), "{text}");
            break;
        }
        assert!(Instant::now() < deadline, "{text}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let all = stdout(&ctl(&control, &["status", "--all"]).await);
    assert!(
        all.contains("pod-1") && all.contains("disconnected"),
        "{all}"
    );
}

/// A command line clap refuses exits 64 (EX_USAGE, as documented), not clap's own 2, with the
/// reason on stderr; `--help` and `--version` are answers, not errors: stdout and exit 0.
#[test]
fn usage_errors_exit_64_and_help_and_version_exit_0() {
    let run = |args: &[&str]| {
        Command::new(ctl_binary())
            .args(args)
            .stdin(Stdio::null())
            .output()
            .unwrap()
    };
    for (args, says) in [
        (&[][..], "Usage: outriderctl"),
        (&["nosuchverb"], "unrecognized subcommand 'nosuchverb'"),
        (
            &["validate", "--nosuchflag"],
            "unexpected argument '--nosuchflag'",
        ),
        (&["completion"], "required arguments were not provided"),
        (&["completion", "tcsh"], "invalid value 'tcsh'"),
    ] {
        let out = run(args);
        assert_eq!(code(&out), 64, "{args:?}: {}", stderr(&out));
        assert!(stderr(&out).contains(says), "{args:?}: {}", stderr(&out));
        assert_eq!(stdout(&out), "", "{args:?}");
    }
    for (args, says) in [
        (&["--help"][..], "Usage: outriderctl"),
        (&["validate", "--help"], "Usage: outriderctl validate"),
        (
            &["--version"],
            concat!("outriderctl ", env!("CARGO_PKG_VERSION")),
        ),
    ] {
        let out = run(args);
        assert_eq!(code(&out), 0, "{args:?}: {}", stderr(&out));
        assert!(stdout(&out).contains(says), "{args:?}: {}", stdout(&out));
    }
}

/// The image ships `outriderctl` as a symlink to `outrider-control`: called by that name, the
/// control plane's binary is the CLI (its version line, its verbs, its exit codes); by its own
/// name it is still the server.
#[test]
fn outrider_control_called_outriderctl_is_the_cli() {
    let dir = TempDir::new();
    let link = dir.path.join("outriderctl");
    std::os::unix::fs::symlink(control_binary(), &link).unwrap();
    let run = |program: &Path, args: &[&str]| {
        Command::new(program)
            .args(args)
            .stdin(Stdio::null())
            .output()
            .unwrap()
    };
    let out = run(&link, &["--version"]);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    assert_eq!(
        stdout(&out),
        concat!("outriderctl ", env!("CARGO_PKG_VERSION"), "\n")
    );
    let policy = dir.path.join("policy.yaml");
    std::fs::write(&policy, "services: { s: { endpoints: [127.0.0.1:9] } }\n").unwrap();
    let out = run(&link, &["validate", "-f", policy.to_str().unwrap()]);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    let out = run(&link, &["nosuchverb"]);
    assert_eq!(code(&out), 64, "{}", stderr(&out));
    assert!(
        stderr(&out).contains("Usage: outriderctl"),
        "{}",
        stderr(&out)
    );
    // By its own name: the server, which has no `validate`.
    let out = run(&control_binary(), &["validate"]);
    assert_eq!(code(&out), 64, "{}", stderr(&out));
    assert!(
        stderr(&out).contains("Usage: outrider-control"),
        "{}",
        stderr(&out)
    );
}
