//! The control plane end to end: the real `outrider-control` binary, a real watched directory
//! and raw subscription streams over HTTP/1.1 and h2c on 127.0.0.1.

#![allow(clippy::unwrap_used, missing_docs)]

use std::time::{Duration, Instant};

use outrider_config::wire::ServerMessage;
use outrider_e2e::control::configmap_swap;
use outrider_e2e::{start_control, start_control_with, ControlDirs, CONTROL_TOKEN};

const DEFAULTS: &str = "workload: \"*\"
services:
  payments: { endpoints: [127.0.0.1:9101] }
routes:
  - { match: { authority: payments }, service: payments }
";

fn defaults_with(endpoint: &str) -> String {
    DEFAULTS.replace("127.0.0.1:9101", endpoint)
}

/// Time for a file edit to reach a subscriber: 50 ms debounce + validation + fsync + push,
/// with room for a loaded 2-core CI machine.
const PUSH_BOUND: Duration = Duration::from_secs(1);

#[tokio::test]
async fn a_file_edit_is_pushed_to_every_subscription_within_the_bound() {
    let dirs = ControlDirs::new();
    dirs.write("defaults.yaml", DEFAULTS);
    let control = start_control(&dirs);
    let mut h2 = control.subscribe("checkout", "pod-h2", true).await;
    let mut h1 = control.subscribe("checkout", "pod-h1", false).await;
    let first = h2.next_update(PUSH_BOUND).await.expect("initial policy");
    assert!(first.policy.contains("127.0.0.1:9101"), "{}", first.policy);
    assert_eq!(
        first.content_hash,
        outrider_config::content_hash(&first.policy)
    );
    outrider_config::load("pushed", &first.policy).expect("pushed policy loads");
    assert_eq!(h1.next_update(PUSH_BOUND).await.unwrap(), first);

    let edited = Instant::now();
    dirs.write("defaults.yaml", &defaults_with("127.0.0.1:9102"));
    let update = h2.next_update(PUSH_BOUND).await.expect("pushed");
    let latency = edited.elapsed();
    assert!(update.version > first.version);
    assert!(update.policy.contains("127.0.0.1:9102"));
    assert_eq!(h1.next_update(PUSH_BOUND).await.unwrap(), update);
    eprintln!("file edit -> update received over h2: {latency:?}");

    // Both proxies are tracked, with the version sent.
    let status = control.status().await;
    let proxies = status["proxies"].as_array().unwrap();
    assert_eq!(proxies.len(), 2);
    for p in proxies {
        assert_eq!(p["connected"], true);
        assert_eq!(p["workload"], "checkout");
        assert_eq!(p["version_sent"], update.version);
    }
}

#[tokio::test]
async fn invalid_document_is_rejected_with_position_and_the_others_still_go_out() {
    let dirs = ControlDirs::new();
    dirs.write("defaults.yaml", DEFAULTS);
    dirs.write(
        "checkout.yaml",
        "workload: checkout\nservices: { cart: { endpoints: [127.0.0.1:9201] } }\n",
    );
    let control = start_control(&dirs);
    let mut sub = control.subscribe("checkout", "pod-1", true).await;
    let first = sub.next_update(PUSH_BOUND).await.unwrap();
    assert!(first.policy.contains("127.0.0.1:9201"));

    // One burst: a broken edit of checkout.yaml and a valid edit of defaults.yaml.
    dirs.write(
        "checkout.yaml",
        "workload: checkout\nservices:\n  cart: { endpoints: [127.0.0.1:9202] }\nroutes:\n  - match: { authority: cart }\n    service: kart\n",
    );
    dirs.write("defaults.yaml", &defaults_with("127.0.0.1:9102"));
    let update = sub
        .next_update(PUSH_BOUND)
        .await
        .expect("valid change pushed");
    assert!(
        update.policy.contains("127.0.0.1:9102"),
        "defaults went out"
    );
    assert!(
        update.policy.contains("127.0.0.1:9201") && !update.policy.contains("127.0.0.1:9202"),
        "the previous checkout.yaml stays in force: {}",
        update.policy
    );
    let status = control.status().await;
    let doc = status["documents"]
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["name"] == "checkout.yaml")
        .unwrap();
    let rejected = &doc["rejected"];
    assert_eq!(doc["changed_at"], first.version, "old version in force");
    assert_eq!(rejected["diagnostics"][0]["path"], "routes[0].service");
    assert_eq!(rejected["diagnostics"][0]["line"], 6);
    assert_eq!(rejected["diagnostics"][0]["column"], 14);
    assert!(
        rejected["message"]
            .as_str()
            .unwrap()
            .ends_with("at checkout.yaml:6:14"),
        "{rejected}"
    );
    assert!(
        control.wait_log(Duration::from_secs(2), |l| l.contains("document rejected")
            && l.contains("checkout.yaml:6:14"))
    );

    // A broken edit alone: nothing is pushed, the stream only beats.
    dirs.write("checkout.yaml", "workload: checkout\nservices: [\n");
    let quiet = Instant::now();
    while quiet.elapsed() < Duration::from_millis(1500) {
        match sub.next(Duration::from_millis(1500)).await {
            Some(ServerMessage::Heartbeat) => {}
            other => panic!("nothing must be pushed for a rejected document, got {other:?}"),
        }
    }
    assert_eq!(control.status().await["version"], update.version);
}

#[tokio::test]
async fn a_conflict_rejects_the_later_document_naming_both() {
    let dirs = ControlDirs::new();
    dirs.write(
        "a.yaml",
        "workload: checkout\nservices: { cart: { endpoints: [127.0.0.1:9201] } }\n",
    );
    let control = start_control(&dirs);
    let mut sub = control.subscribe("checkout", "pod-1", false).await;
    let first = sub.next_update(PUSH_BOUND).await.unwrap();
    dirs.write(
        "b.yaml",
        "workload: [search, checkout]\nservices: { cart: { endpoints: [127.0.0.1:9301] } }\n",
    );
    let deadline = Instant::now() + PUSH_BOUND;
    let rejected = loop {
        let status = control.status().await;
        let doc = status["documents"]
            .as_array()
            .unwrap()
            .iter()
            .find(|d| d["name"] == "b.yaml")
            .cloned();
        if let Some(doc) = doc {
            break doc["rejected"]["message"].as_str().unwrap().to_string();
        }
        assert!(Instant::now() < deadline, "b.yaml not processed");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(
        rejected,
        "b.yaml: service `cart` is defined for workload `checkout` by both `a.yaml` and `b.yaml`"
    );
    // Listen-port clash across documents, same treatment.
    dirs.write(
        "c.yaml",
        "workload: checkout\nservices: { x: { endpoints: [127.0.0.1:1], listen: 127.0.0.1:9001 } }\n",
    );
    let second = sub.next_update(PUSH_BOUND).await.expect("c.yaml accepted");
    dirs.write(
        "d.yaml",
        "workload: \"*\"\nservices: { y: { endpoints: [127.0.0.1:2], listen: 127.0.0.1:9001 } }\n",
    );
    let deadline = Instant::now() + PUSH_BOUND;
    loop {
        let status = control.status().await;
        let message = status["documents"]
            .as_array()
            .unwrap()
            .iter()
            .find(|d| d["name"] == "d.yaml")
            .map(|d| d["rejected"]["message"].as_str().unwrap().to_string());
        if let Some(message) = message {
            assert!(
                message.contains("127.0.0.1:9001")
                    && message.contains("`c.yaml`")
                    && message.contains("`d.yaml`"),
                "{message}"
            );
            break;
        }
        assert!(Instant::now() < deadline, "d.yaml not processed");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(second.version > first.version);
    assert!(
        matches!(
            sub.next(Duration::from_millis(1500)).await,
            Some(ServerMessage::Heartbeat)
        ),
        "no push for a rejected conflict"
    );
}

#[tokio::test]
async fn a_configmap_symlink_swap_is_pushed() {
    let dirs = ControlDirs::new();
    configmap_swap(&dirs.policies, 1, &[("defaults.yaml", DEFAULTS)]);
    let control = start_control(&dirs);
    let mut sub = control.subscribe("checkout", "pod-1", true).await;
    let first = sub.next_update(PUSH_BOUND).await.unwrap();
    assert!(first.policy.contains("127.0.0.1:9101"));
    configmap_swap(
        &dirs.policies,
        2,
        &[("defaults.yaml", &defaults_with("127.0.0.1:9109"))],
    );
    let update = sub.next_update(PUSH_BOUND).await.expect("swap pushed");
    assert!(
        update.policy.contains("127.0.0.1:9109"),
        "{}",
        update.policy
    );
}

#[tokio::test]
async fn a_killed_control_plane_restarts_with_its_history_and_no_re_push() {
    let dirs = ControlDirs::new();
    dirs.write("defaults.yaml", DEFAULTS);
    let control = start_control(&dirs);
    let mut sub = control.subscribe("checkout", "pod-1", true).await;
    sub.next_update(PUSH_BOUND).await.unwrap();
    dirs.write("defaults.yaml", &defaults_with("127.0.0.1:9102"));
    let latest = sub.next_update(PUSH_BOUND).await.unwrap();
    let applied = control
        .request(
            "POST",
            "/v1/apply?name=extra",
            "workload: search\nservices: { s: { endpoints: [127.0.0.1:9500] } }\n",
        )
        .await;
    assert_eq!(applied.status, 200, "{:?}", applied.body);
    let history = control.request("GET", "/v1/history", "").await.json();
    assert_eq!(history.as_array().unwrap().len(), 3);
    control.kill();

    let control = start_control(&dirs);
    assert_eq!(
        control.request("GET", "/v1/history", "").await.json(),
        history,
        "history survives a SIGKILL"
    );
    // Each workload keeps the version its policy last changed at, not the latest.
    let checkout = control
        .request("GET", "/v1/policy?workload=checkout", "")
        .await
        .json();
    assert_eq!(checkout["version"], latest.version);
    assert_eq!(checkout["content_hash"], latest.content_hash.as_str());
    let search = control
        .request("GET", "/v1/policy?workload=search", "")
        .await;
    assert!(search.json()["policy"]
        .as_str()
        .unwrap()
        .contains("127.0.0.1:9500"));
    // A proxy resuming with the hash it has gets no re-push, only heartbeats.
    let mut resumed = control
        .subscribe_with("checkout", "pod-1", Some(&latest.content_hash), true)
        .await;
    assert!(matches!(
        resumed.next(Duration::from_secs(3)).await,
        Some(ServerMessage::Heartbeat)
    ));
    // One with an old hash gets the current policy.
    let mut stale = control
        .subscribe_with("checkout", "pod-2", Some("0000"), false)
        .await;
    assert_eq!(
        stale.next_update(PUSH_BOUND).await.unwrap().content_hash,
        latest.content_hash
    );
}

#[tokio::test]
async fn rollback_pushes_the_old_content_as_a_new_version() {
    let dirs = ControlDirs::new();
    dirs.write("defaults.yaml", DEFAULTS);
    let control = start_control(&dirs);
    let mut sub = control.subscribe("checkout", "pod-1", true).await;
    let v1 = sub.next_update(PUSH_BOUND).await.unwrap();
    dirs.write("defaults.yaml", &defaults_with("127.0.0.1:9102"));
    let v2 = sub.next_update(PUSH_BOUND).await.unwrap();
    let reply = control
        .request("POST", &format!("/v1/rollback?to={}", v1.version), "")
        .await;
    assert_eq!(reply.status, 200);
    let v3 = sub.next_update(PUSH_BOUND).await.expect("rollback pushed");
    assert!(v3.version > v2.version);
    assert_eq!(v3.content_hash, v1.content_hash);
    assert_eq!(v3.policy, v1.policy);
    assert_eq!(reply.json()["version"], v3.version);
    let missing = control.request("POST", "/v1/rollback?to=999", "").await;
    assert_eq!(missing.status, 404);
    // The rollback survives a restart: unchanged files are not re-applied over it.
    control.kill();
    let control = start_control(&dirs);
    let policy = control
        .request("GET", "/v1/policy?workload=checkout", "")
        .await;
    assert_eq!(policy.json()["content_hash"], v1.content_hash.as_str());
}

#[tokio::test]
async fn a_wrong_token_is_refused_with_401_and_logged() {
    let dirs = ControlDirs::new();
    dirs.write("defaults.yaml", DEFAULTS);
    let control = start_control(&dirs);
    for (method, path) in [
        ("GET", "/v1/subscribe?workload=checkout&proxy=x"),
        ("POST", "/v1/ack"),
        ("POST", "/v1/apply?name=x"),
        ("GET", "/v1/history"),
        ("POST", "/v1/rollback?to=1"),
        ("GET", "/v1/policy?workload=checkout"),
    ] {
        for token in [None, Some("wrong"), Some(&CONTROL_TOKEN[1..])] {
            let reply = control.request_with_token(method, path, "", token).await;
            assert_eq!(reply.status, 401, "{method} {path} with {token:?}");
            assert_eq!(reply.header("www-authenticate"), Some("Bearer"));
        }
    }
    assert!(control.wait_log(Duration::from_secs(2), |l| l
        .contains("unauthorized request refused")
        && l.contains("/v1/apply")));
    // Read-only endpoints open on loopback.
    assert_eq!(
        control
            .request_with_token("GET", "/v1/status", "", None)
            .await
            .status,
        200
    );
    assert_eq!(
        control
            .request_with_token("GET", "/ready", "", None)
            .await
            .status,
        200
    );
    assert_eq!(
        control
            .request_with_token("GET", "/live", "", None)
            .await
            .status,
        200
    );
    // The proxy was never registered.
    assert!(control.status().await["proxies"]
        .as_array()
        .unwrap()
        .is_empty());
}

#[tokio::test]
async fn acks_and_nacks_show_in_status() {
    let dirs = ControlDirs::new();
    dirs.write("defaults.yaml", DEFAULTS);
    let control = start_control(&dirs);
    let mut sub = control.subscribe("checkout", "pod-1", true).await;
    let update = sub.next_update(PUSH_BOUND).await.unwrap();
    let ack = |error: Option<&str>| {
        serde_json::json!({
            "proxy": "pod-1",
            "workload": "checkout",
            "version": update.version,
            "content_hash": update.content_hash,
            "error": error,
            "session": sub.session,
        })
        .to_string()
    };
    let proxy = |status: &serde_json::Value| status["proxies"][0].clone();
    assert_eq!(proxy(&control.status().await)["state"], "pending");
    let reply = control
        .request(
            "POST",
            "/v1/ack",
            &ack(Some("listen 127.0.0.1:9001: address in use")),
        )
        .await;
    assert_eq!(reply.status, 204);
    let p = proxy(&control.status().await);
    assert_eq!(p["state"], "nack");
    assert_eq!(
        p["last_nack"]["error"],
        "listen 127.0.0.1:9001: address in use"
    );
    assert_eq!(p["last_nack"]["version"], update.version);
    assert_eq!(
        control.request("POST", "/v1/ack", &ack(None)).await.status,
        204
    );
    let p = proxy(&control.status().await);
    assert_eq!(p["state"], "in-sync");
    assert_eq!(p["version_applied"], update.version);
    assert!(p["applied_at_ms"].as_u64().unwrap() > 0);
    drop(sub);
    let deadline = Instant::now() + Duration::from_secs(5);
    while proxy(&control.status().await)["state"] != "disconnected" {
        assert!(Instant::now() < deadline, "disconnect not noticed");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let bad = control.request("POST", "/v1/ack", "{\"proxy\":1}").await;
    assert_eq!(bad.status, 400);
}

#[tokio::test]
async fn the_listen_address_is_kept_across_a_restart_when_given() {
    let dirs = ControlDirs::new();
    dirs.write("defaults.yaml", DEFAULTS);
    let control = start_control(&dirs);
    let addr = control.addr.to_string();
    control.kill();
    let control = start_control_with(&dirs, &["--listen", &addr]);
    assert_eq!(control.addr.to_string(), addr);
}

fn stdout(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn stderr(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[tokio::test]
async fn outriderctl_apply_shows_the_diff_pushes_and_rejects_with_a_caret() {
    let dirs = ControlDirs::new();
    dirs.write("defaults.yaml", DEFAULTS);
    let control = start_control(&dirs);
    let mut sub = control.subscribe("checkout", "pod-1", true).await;
    let first = sub.next_update(PUSH_BOUND).await.unwrap();

    let work = outrider_e2e::TempDir::new();
    let file = work.path.join("checkout.yaml");
    let file_arg = file.to_str().unwrap();
    let v1 = "workload: checkout\nservices:\n  cart: { endpoints: [127.0.0.1:9201] }\nroutes:\n  - { match: { authority: cart }, service: cart }\n";
    std::fs::write(&file, v1).unwrap();
    // A dry run shows the diff and what would change, and changes nothing.
    let out = control.ctl(&["apply", "--dry-run", "-f", file_arg]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stdout(&out).contains("+  cart: { endpoints: [127.0.0.1:9201] }")
            && stdout(&out).contains(&format!(
                "checkout.yaml: valid; would be version {} and change workloads checkout (dry run: nothing applied)",
                first.version + 1
            )),
        "{}",
        stdout(&out)
    );
    assert!(matches!(
        sub.next(Duration::from_millis(1500)).await,
        Some(ServerMessage::Heartbeat)
    ));
    assert_eq!(control.status().await["version"], first.version);
    let out = control.ctl(&["apply", "-f", file_arg]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stdout(&out).contains("+  cart: { endpoints: [127.0.0.1:9201] }"),
        "{}",
        stdout(&out)
    );
    let pushed = sub.next_update(PUSH_BOUND).await.expect("apply pushed");
    assert!(pushed.version > first.version);
    assert!(pushed.policy.contains("127.0.0.1:9201"));
    assert!(stdout(&out).contains(&format!(
        "checkout.yaml: applied as version {}; pushed to workloads checkout",
        pushed.version
    )));

    // An edit: the diff is against the version in force.
    std::fs::write(&file, v1.replace("9201", "9202")).unwrap();
    let out = control.ctl(&["apply", "-f", file_arg]);
    assert!(out.status.success());
    let text = stdout(&out);
    assert!(
        text.contains(&format!("--- checkout.yaml (version {})", pushed.version))
            && text.contains("-  cart: { endpoints: [127.0.0.1:9201] }")
            && text.contains("+  cart: { endpoints: [127.0.0.1:9202] }"),
        "{text}"
    );
    let second = sub.next_update(PUSH_BOUND).await.unwrap();

    // Rejected: exit 1, the problem with file, line, column and a caret; nothing pushed.
    std::fs::write(
        &file,
        "workload: checkout\nroutes:\n  - match: { authority: cart }\n    service: kart\n",
    )
    .unwrap();
    let out = control.ctl(&["apply", "-f", file_arg]);
    assert_eq!(out.status.code(), Some(1));
    let err = stderr(&out);
    assert!(err.contains("--> checkout.yaml:4:14"), "{err}");
    assert!(
        err.contains("4 |     service: kart\n  |              ^"),
        "{err}"
    );
    assert!(err.contains("checkout.yaml rejected; the version in force is unchanged"));
    assert!(matches!(
        sub.next(Duration::from_millis(1500)).await,
        Some(ServerMessage::Heartbeat)
    ));
    let get = control.ctl(&["get", "checkout"]);
    assert!(get.status.success());
    assert!(stdout(&get).contains("127.0.0.1:9202"));
    assert!(stdout(&get).starts_with(&format!(
        "# workload checkout, version {}, sha256 {}\n",
        second.version, second.content_hash
    )));
    // What `get` prints is the pushed policy, loadable as is.
    outrider_config::load("get", &stdout(&get)).expect("valid YAML policy");
}

#[tokio::test]
async fn outriderctl_status_history_and_rollback() {
    let dirs = ControlDirs::new();
    dirs.write("defaults.yaml", DEFAULTS);
    let control = start_control(&dirs);
    let mut sub = control.subscribe("checkout", "pod-7", true).await;
    let v1 = sub.next_update(PUSH_BOUND).await.unwrap();
    dirs.write("defaults.yaml", &defaults_with("127.0.0.1:9102"));
    let v2 = sub.next_update(PUSH_BOUND).await.unwrap();
    let ack = serde_json::json!({
        "proxy": "pod-7", "workload": "checkout", "version": v2.version,
        "content_hash": v2.content_hash, "error": "listen 127.0.0.1:9001: address in use",
        "session": sub.session,
    });
    assert_eq!(
        control
            .request("POST", "/v1/ack", &ack.to_string())
            .await
            .status,
        204
    );

    let out = control.ctl(&["status"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let text = stdout(&out);
    let header = text.lines().find(|l| l.starts_with("PROXY")).unwrap();
    assert!(
        header.contains("WORKLOAD")
            && header.contains("VERSION")
            && header.contains("APPLIED AT")
            && header.contains("STATE"),
        "{text}"
    );
    let row = text.lines().find(|l| l.starts_with("pod-7")).unwrap();
    assert!(row.contains("checkout") && row.contains("nack"), "{text}");
    assert!(
        row.contains("listen 127.0.0.1:9001: address in use"),
        "{text}"
    );

    let out = control.ctl(&["history"]);
    let text = stdout(&out);
    let versions: Vec<&str> = text
        .lines()
        .skip(1)
        .map(|l| l.split_whitespace().next().unwrap())
        .collect();
    assert_eq!(versions, [v2.version.to_string(), v1.version.to_string()]);
    assert!(text.contains("files changed: defaults.yaml"));

    let out = control.ctl(&["rollback", "--to", &v1.version.to_string()]);
    assert!(out.status.success(), "{}", stderr(&out));
    let v3 = sub.next_update(PUSH_BOUND).await.expect("rollback pushed");
    assert_eq!(v3.content_hash, v1.content_hash);
    assert!(stdout(&out).contains(&format!(
        "rolled back to version {} as version {}",
        v1.version, v3.version
    )));
    let out = control.ctl(&["rollback", "--to", "999"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("version 999 is not in the kept history"));
}

#[tokio::test]
async fn outriderctl_delete_removes_an_applied_document_and_proxies_converge() {
    let dirs = ControlDirs::new();
    dirs.write("defaults.yaml", DEFAULTS);
    let control = start_control(&dirs);
    let mut sub = control.subscribe("checkout", "pod-1", true).await;
    let first = sub.next_update(PUSH_BOUND).await.unwrap();

    let work = outrider_e2e::TempDir::new();
    let file = work.path.join("checkout.yaml");
    std::fs::write(
        &file,
        "workload: checkout\nservices:\n  cart: { endpoints: [127.0.0.1:9201] }\n",
    )
    .unwrap();
    let out = control.ctl(&["apply", "-f", file.to_str().unwrap()]);
    assert!(out.status.success(), "{}", stderr(&out));
    let applied = sub.next_update(PUSH_BOUND).await.expect("apply pushed");
    assert!(applied.policy.contains("127.0.0.1:9201"));

    let out = control.ctl(&["delete", "checkout.yaml"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let deleted = sub.next_update(PUSH_BOUND).await.expect("delete pushed");
    assert!(deleted.version > applied.version);
    // Back to what the defaults alone make.
    assert_eq!(deleted.content_hash, first.content_hash);
    assert!(!deleted.policy.contains("127.0.0.1:9201"));
    assert!(
        stdout(&out).contains(&format!(
            "checkout.yaml: deleted as version {}; pushed to workloads checkout",
            deleted.version
        )),
        "{}",
        stdout(&out)
    );
    let history = stdout(&control.ctl(&["history"]));
    assert!(history.contains("delete checkout.yaml"), "{history}");

    // Unknown names and file-backed documents: exit 1, the reason, nothing pushed.
    let out = control.ctl(&["delete", "checkout.yaml"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("no document named checkout.yaml is in force"),
        "{}",
        stderr(&out)
    );
    let out = control.ctl(&["delete", "defaults.yaml"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out)
            .contains("defaults.yaml comes from the policy directory: delete the file instead"),
        "{}",
        stderr(&out)
    );
    assert!(matches!(
        sub.next(Duration::from_millis(1500)).await,
        Some(ServerMessage::Heartbeat)
    ));
    assert_eq!(control.status().await["version"], deleted.version);
}

#[tokio::test]
async fn made_up_workloads_and_gone_proxies_expire() {
    let dirs = ControlDirs::new();
    dirs.write("defaults.yaml", DEFAULTS);
    let control = start_control_with(&dirs, &["--registry-expiry", "2s"]);
    let workloads = |reply: &outrider_e2e::Reply| -> Vec<String> {
        reply.json()["workloads"]
            .as_array()
            .unwrap()
            .iter()
            .map(|w| w["workload"].as_str().unwrap().to_string())
            .collect()
    };
    for i in 0..20 {
        let path = format!("/v1/policy?workload=ghost-{i}");
        assert_eq!(control.request("GET", &path, "").await.status, 200);
    }
    let mut sub = control.subscribe("ghost-sub", "p-ghost", false).await;
    sub.next_update(PUSH_BOUND).await.expect("initial policy");
    // A default change re-merges every workload known, made-up ones included.
    let extra = "services:\n  extra: { endpoints: [127.0.0.1:9301] }\n";
    let reply = control.request("POST", "/v1/apply?name=extra", extra).await;
    assert_eq!(reply.status, 200);
    let changed = workloads(&reply);
    assert_eq!(changed.len(), 22, "{changed:?}");
    assert!(changed.contains(&"ghost-19".to_string()), "{changed:?}");

    drop(sub);
    let known = |status: &serde_json::Value| {
        status["proxies"]
            .as_array()
            .unwrap()
            .iter()
            .any(|p| p["proxy"] == "p-ghost")
    };
    assert!(known(&control.status().await));
    let deadline = Instant::now() + Duration::from_secs(10);
    while known(&control.status().await) {
        assert!(Instant::now() < deadline, "p-ghost not forgotten");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // The made-up workloads are forgotten too: a change no longer re-merges them.
    let dry_run = extra.replace("9301", "9302");
    loop {
        let reply = control
            .request("POST", "/v1/apply?name=extra&dry_run=1", &dry_run)
            .await;
        assert_eq!(reply.status, 200);
        let changed = workloads(&reply);
        if changed == ["*"] {
            break;
        }
        assert!(Instant::now() < deadline, "still re-merged: {changed:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn outriderctl_says_clearly_when_the_server_is_down_or_the_token_wrong() {
    let dirs = ControlDirs::new();
    let control = start_control(&dirs);
    let url = control.url();
    let out = outrider_e2e::control::ctl(&url, Some("wrong"), &["history"]);
    assert_eq!(out.status.code(), Some(77));
    assert!(
        stderr(&out).contains(&format!(
            "the control plane at {url} refused the token (401)"
        )),
        "{}",
        stderr(&out)
    );
    let out = outrider_e2e::control::ctl(&url, None, &["history"]);
    assert_eq!(out.status.code(), Some(77));
    assert!(stderr(&out).contains("no token given"), "{}", stderr(&out));
    // Status is open from loopback: no token needed.
    assert!(outrider_e2e::control::ctl(&url, None, &["status"])
        .status
        .success());
    control.kill();
    let out = outrider_e2e::control::ctl(&url, Some(CONTROL_TOKEN), &["status"]);
    assert_eq!(out.status.code(), Some(69));
    assert!(
        stderr(&out).contains(&format!("cannot reach the control plane at {url}"))
            && stderr(&out).contains("is outrider-control running?"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn an_etcd_timeout_outside_its_bounds_is_a_usage_error() {
    // Deadlines are `now + --etcd-timeout`: an unbounded one would overflow the clock.
    for timeout in ["99999999999h", "0s", "50ms", "2m"] {
        let out = std::process::Command::new(outrider_e2e::control_binary())
            .args([
                "serve",
                "--store",
                "etcd://127.0.0.1:1",
                "--etcd-timeout",
                timeout,
            ])
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(64), "{timeout}: {}", stderr(&out));
        assert!(
            stderr(&out).contains("outside 100ms..=1m"),
            "{timeout}: {}",
            stderr(&out)
        );
    }
}

/// `outriderctl validate` on `text` (written to `name`): its exit code, stderr, the file's
/// path and the wall time of the fastest of three runs.
fn validate_text(name: &str, text: &str) -> (Option<i32>, String, String, Duration) {
    let dir = outrider_e2e::TempDir::new();
    let path = dir.path.join(name);
    std::fs::write(&path, text).unwrap();
    let (out, took) = outrider_e2e::hostile::fastest_of_three(|| {
        outrider_e2e::control::ctl(
            "http://127.0.0.1:1",
            None,
            &["validate", "-f", path.to_str().unwrap()],
        )
    });
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    (out.status.code(), stderr, path.display().to_string(), took)
}

#[test]
fn validate_refuses_durations_the_proxy_cannot_use_with_their_position() {
    // On the old validator this passed, and every proxy panicked on its first request.
    let (code, stderr, path, _) = validate_text(
        "overflow.yaml",
        "services:
  payments:
    endpoints: [127.0.0.1:9101]
    timeouts: { request: 9223372036854775807s }
routes:
  - match: { authority: payments }
    service: payments
    timeouts: { per_try: 9223372036854775807s }
",
    );
    assert_eq!(code, Some(1), "{stderr}");
    for (what, at) in [
        ("services.payments.timeouts.request", "4:26"),
        ("routes[0].timeouts.per_try", "8:26"),
    ] {
        let expected = format!("error: {what}: must be at most 24h\n  --> {path}:{at}");
        assert!(stderr.contains(&expected), "{expected}\n{stderr}");
    }
}

#[test]
fn validate_refuses_an_alias_bomb_and_deep_nesting_quickly_naming_the_budget() {
    for (name, text, budget) in [
        (
            "bomb.yaml",
            outrider_e2e::hostile::alias_bomb(),
            "budget exceeded: alias expansion is more than 5000 nodes",
        ),
        (
            "deep.yaml",
            outrider_e2e::hostile::deep_nesting(),
            "budget exceeded: nesting depth is more than 64 levels",
        ),
    ] {
        let (code, stderr, path, took) = validate_text(name, &text);
        assert_eq!(code, Some(1), "{stderr}");
        assert!(stderr.contains(budget), "{stderr}");
        assert!(stderr.contains(&format!("--> {path}:")), "{stderr}");
        // Compared with a file refused at once, so only the parse counts (on the old parser
        // the nesting alone took 30 s).
        let (_, _, _, reference) =
            validate_text("reference.yaml", outrider_e2e::hostile::REFUSED_AT_ONCE);
        assert!(
            took < reference + Duration::from_millis(100),
            "{name}: took {took:?}, a file refused at once {reference:?}"
        );
    }
}

/// Three structural mistakes in three services: each stopped the parse on its own before.
const THREE_STRUCTURAL_ERRORS: &str = "services:
  payments:
    endpoints: [127.0.0.1:9101]
    endpiont: 127.0.0.1:9102
  cart:
    endpoints: [127.0.0.1:9201]
    timeouts: { connect: 5parsecs }
  reviews:
    endpoints: [127.0.0.1:9301]
    protocol: http3
";

/// Path, message start and line:column of each error in [`THREE_STRUCTURAL_ERRORS`].
const THE_THREE: [(&str, &str, usize, usize); 3] = [
    (
        "services.payments.endpiont",
        "unknown field `endpiont`",
        4,
        5,
    ),
    (
        "services.cart.timeouts.connect",
        "duration `5parsecs` has an unknown unit",
        7,
        26,
    ),
    (
        "services.reviews.protocol",
        "unknown variant `http3`",
        10,
        15,
    ),
];

#[test]
fn validate_reports_every_structural_error_with_its_position() {
    let (code, stderr, path, _) = validate_text("three.yaml", THREE_STRUCTURAL_ERRORS);
    assert_eq!(code, Some(1), "{stderr}");
    for (what, message, line, column) in THE_THREE {
        let expected = format!("error: {what}: {message}");
        let at = format!("  --> {path}:{line}:{column}");
        assert!(
            stderr.contains(&expected) && stderr.contains(&at),
            "{expected} {at}\n{stderr}"
        );
    }
    assert_eq!(stderr.matches("error: ").count(), 3, "{stderr}");
}

#[tokio::test]
async fn apply_reports_every_structural_error_with_its_position() {
    let dirs = ControlDirs::new();
    dirs.write("defaults.yaml", DEFAULTS);
    let control = start_control(&dirs);
    let reply = control
        .request("POST", "/v1/apply?name=three", THREE_STRUCTURAL_ERRORS)
        .await;
    assert_eq!(
        reply.status,
        422,
        "{}",
        String::from_utf8_lossy(&reply.body)
    );
    let body = reply.json();
    let diagnostics = body["diagnostics"].as_array().expect("diagnostics");
    assert_eq!(diagnostics.len(), 3, "{body}");
    for (found, (what, message, line, column)) in diagnostics.iter().zip(THE_THREE) {
        assert_eq!(found["path"], what, "{body}");
        assert!(
            found["message"].as_str().unwrap().starts_with(message),
            "{body}"
        );
        assert_eq!(found["line"], line, "{body}");
        assert_eq!(found["column"], column, "{body}");
    }
}

#[test]
fn validate_names_both_places_of_a_duplicate_key() {
    let (code, stderr, path, _) = validate_text(
        "dup.yaml",
        "services:
  payments: { endpoints: [127.0.0.1:9101] }
  payments: { endpoints: [127.0.0.1:9] }
",
    );
    assert_eq!(code, Some(1), "{stderr}");
    let expected = format!(
        "error: services.payments: duplicate key (first at line 2, column 3; a key may appear \
         once)\n  --> {path}:3:3"
    );
    assert!(stderr.contains(&expected), "{expected}\n{stderr}");
}

#[tokio::test]
async fn a_file_saved_empty_keeps_its_document() {
    let dirs = ControlDirs::new();
    dirs.write("defaults.yaml", DEFAULTS);
    let control = start_control(&dirs);
    let mut sub = control.subscribe("checkout", "pod-1", true).await;
    let first = sub.next_update(PUSH_BOUND).await.unwrap();
    assert!(first.policy.contains("127.0.0.1:9101"));

    // A save caught between its truncate and its write, then an unrelated valid change: the
    // change goes out, the defaults stay.
    std::fs::File::create(dirs.policies.join("defaults.yaml")).unwrap();
    dirs.write(
        "checkout.yaml",
        "workload: checkout\nservices: { cart: { endpoints: [127.0.0.1:9201] } }\n",
    );
    let update = sub.next_update(PUSH_BOUND).await.expect("pushed");
    assert!(
        update.policy.contains("127.0.0.1:9201"),
        "{}",
        update.policy
    );
    assert!(
        update.policy.contains("127.0.0.1:9101"),
        "the empty save removed the defaults: {}",
        update.policy
    );
    let status = control.status().await;
    let defaults = status["documents"]
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["name"] == "defaults.yaml")
        .unwrap();
    assert_eq!(defaults["changed_at"], first.version, "{status}");
    assert!(control.wait_log(Duration::from_secs(2), |l| l
        .contains("policy file is empty")
        && l.contains("defaults.yaml")));

    // The write that completes the save goes out.
    std::fs::write(
        dirs.policies.join("defaults.yaml"),
        defaults_with("127.0.0.1:9102"),
    )
    .unwrap();
    let update = sub.next_update(PUSH_BOUND).await.expect("pushed");
    assert!(
        update.policy.contains("127.0.0.1:9102"),
        "{}",
        update.policy
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_document_holds_back_no_other_apply() {
    let dirs = ControlDirs::new();
    let control = start_control(&dirs);
    // 50,000 levels of nesting: seconds of parsing for the YAML parser this was written
    // against (quadratic in depth), and a budget error for one that refuses such depth.
    let depth = 50_000;
    let slow = format!("services: {}{}\n", "[".repeat(depth), "]".repeat(depth));
    let url = format!("{}/v1/apply?name=slow", control.url());
    let slow_apply = tokio::spawn(async move {
        let req = http::Request::post(url)
            .header("authorization", format!("Bearer {CONTROL_TOKEN}"))
            .body(outrider_e2e::full(slow))
            .unwrap();
        outrider_e2e::send(&outrider_e2e::http1_client(), req).await
    });
    // Let the slow document reach the server first (this orders the two requests; nothing
    // is measured across it).
    tokio::time::sleep(Duration::from_millis(300)).await;
    let file = dirs.state.with_extension("small.yaml");
    std::fs::write(&file, DEFAULTS).unwrap();
    let started = Instant::now();
    let out = tokio::task::spawn_blocking({
        let url = control.url();
        let file = file.clone();
        move || {
            outrider_e2e::control::ctl(
                &url,
                Some(CONTROL_TOKEN),
                &["apply", "-f", file.to_str().unwrap(), "--name", "defaults"],
            )
        }
    })
    .await
    .unwrap();
    let took = started.elapsed();
    eprintln!("apply next to a slow document took {took:?}");
    assert!(
        out.status.success(),
        "{:?}: {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(took < Duration::from_secs(3), "{took:?}");
    slow_apply.abort();
}

#[tokio::test]
async fn a_change_too_large_to_push_is_refused_at_apply() {
    let dirs = ControlDirs::new();
    dirs.write("defaults.yaml", DEFAULTS);
    // A small push limit stands in for the proxies' 16 MiB, which takes long to fill.
    let control = start_control_with(&dirs, &["--max-push-bytes", "4096"]);
    let mut sub = control.subscribe("checkout", "pod-1", false).await;
    let first = sub.next_update(PUSH_BOUND).await.unwrap();
    let services: String = (0..60)
        .map(|i| format!("  s{i}: {{ endpoints: [127.0.0.1:{}] }}\n", 10_000 + i))
        .collect();
    let big = format!("workload: checkout\nservices:\n{services}");
    let file = dirs.state.with_extension("big.yaml");
    std::fs::write(&file, &big).unwrap();
    let out = control.ctl(&["apply", "-f", file.to_str().unwrap(), "--name", "big"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("more than the 4096 a proxy accepts") && stderr.contains("`checkout`"),
        "{stderr}"
    );
    let reply = control.request("POST", "/v1/apply?name=big", &big).await;
    assert_eq!(reply.status, 422, "{:?}", reply.body);
    assert_eq!(control.status().await["version"], first.version);
    // Nothing was pushed.
    match sub.next(Duration::from_millis(1500)).await {
        Some(ServerMessage::Heartbeat) => {}
        other => panic!("nothing must be pushed, got {other:?}"),
    }
}

/// Raw `GET /v1/subscribe` for `workload` with the fixture API token and, when given, a
/// service-account token.
async fn subscribe_raw(
    control: &outrider_e2e::control::Control,
    workload: &str,
    sa_token: Option<&str>,
) -> outrider_e2e::Reply {
    let mut req = http::Request::get(format!(
        "{}/v1/subscribe?workload={workload}&proxy=raw-{workload}",
        control.url()
    ))
    .header("authorization", format!("Bearer {CONTROL_TOKEN}"));
    if let Some(token) = sa_token {
        req = req.header(outrider_config::wire::SERVICE_ACCOUNT_TOKEN_HEADER, token);
    }
    let client = outrider_e2e::http1_client();
    let send = outrider_e2e::send(&client, req.body(outrider_e2e::empty()).unwrap());
    tokio::time::timeout(Duration::from_secs(5), send)
        .await
        .expect("the control plane answers a refused subscription at once")
}

#[tokio::test]
async fn with_sa_jwks_a_proxy_subscribes_only_as_its_service_accounts_workload() {
    let issuer = outrider_e2e::service_account::TokenIssuer::new();
    let dirs = ControlDirs::new();
    dirs.write("defaults.yaml", DEFAULTS);
    let flags = issuer.control_flags();
    let control = start_control_with(&dirs, &flags.each_ref().map(String::as_str));
    let orders_token = issuer.token_file("shop", "orders", "outrider", 3600);
    let proxy = |workload: &str, id: &str, token: Option<&std::ffi::OsString>| {
        let mut args = control.proxy_flags(&dirs, workload);
        args.extend(["--proxy-id".into(), id.into()]);
        if let Some(token) = token {
            args.extend(["--identity-token-file".into(), token.clone()]);
        }
        outrider_e2e::spawn_proxy(outrider_e2e::TempDir::new(), &args)
    };
    let state_of = |status: &serde_json::Value, id: &str| {
        status["proxies"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["proxy"] == id)
            .map(|p| p["state"].as_str().unwrap_or_default().to_string())
    };

    // The pod running as `orders` gets the policy of workload `orders`.
    let orders = proxy("orders", "pod-orders", Some(&orders_token));
    let deadline = Instant::now() + Duration::from_secs(10);
    while state_of(&control.status().await, "pod-orders").as_deref() != Some("in-sync") {
        assert!(
            Instant::now() < deadline,
            "orders never in sync: {}; proxy logs:\n{}",
            control.status().await,
            orders.logs().join("\n")
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // The same token claiming workload `payments`: refused, naming both.
    let token = std::fs::read_to_string(&orders_token).unwrap();
    let reply = subscribe_raw(&control, "payments", Some(&token)).await;
    assert_eq!(reply.status, 403);
    let body = String::from_utf8_lossy(&reply.body);
    assert!(
        body.contains(
            "token is for service account shop/orders; it may subscribe as workload \\\"orders\\\", not \\\"payments\\\""
        ),
        "{body}"
    );
    // Without a token: refused too.
    let reply = subscribe_raw(&control, "orders", None).await;
    assert_eq!(reply.status, 403);
    assert!(
        String::from_utf8_lossy(&reply.body).contains("no service-account token"),
        "{:?}",
        reply.body
    );
    // A proxy started as `payments` with the `orders` token, and one with no token, get
    // nothing: refused at every attempt, never registered.
    let impostor = proxy("payments", "pod-payments", Some(&orders_token));
    let tokenless = proxy("orders", "pod-tokenless", None);
    for refused in [&impostor, &tokenless] {
        let deadline = Instant::now() + Duration::from_secs(5);
        while !refused.logs().iter().any(|l| l.contains("403")) {
            assert!(
                Instant::now() < deadline,
                "no 403 logged:\n{}",
                refused.logs().join("\n")
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(refused.admin_get("/ready").await.0, 503);
    }
    assert!(control.wait_log(Duration::from_secs(2), |l| l
        .contains("subscription refused")
        && l.contains("payments")));
    let status = control.status().await;
    assert_eq!(state_of(&status, "pod-payments"), None, "{status}");
    assert_eq!(state_of(&status, "pod-tokenless"), None, "{status}");
    assert_eq!(state_of(&status, "raw-payments"), None, "{status}");
    assert_eq!(state_of(&status, "pod-orders").as_deref(), Some("in-sync"));
}

/// The control plane's own log fields are plain text (`"peer":"127.0.0.1:5000"`, not Rust's
/// `Some(127.0.0.1:5000)`).
#[tokio::test]
async fn log_fields_are_plain_text() {
    let dirs = ControlDirs::new();
    dirs.write("defaults.yaml", DEFAULTS);
    let control = start_control(&dirs);
    let mut sub = control.subscribe("checkout", "pod-json", false).await;
    sub.next_update(PUSH_BOUND).await.expect("initial policy");
    assert!(
        control.wait_log(PUSH_BOUND, |l| l.contains("proxy subscribed")),
        "{:?}",
        control.logs()
    );
    let line = control
        .logs()
        .into_iter()
        .find(|l| l.contains("proxy subscribed"))
        .unwrap();
    let json: serde_json::Value = serde_json::from_str(&line).unwrap();
    let peer: std::net::SocketAddr = json["peer"].as_str().unwrap().parse().unwrap();
    assert!(peer.ip().is_loopback(), "{line}");
}

/// A pod deleted as it starts: SIGTERM arrives while the store is still opening. The handlers
/// are installed before that, so the process ends by its own exit code (here 69, etcd out of
/// reach once `--etcd-timeout` passes), never killed mid-start by the signal's default action.
#[tokio::test]
async fn a_sigterm_while_the_store_opens_ends_in_order() {
    use std::os::unix::process::ExitStatusExt as _;
    // An "etcd" that accepts connections and never answers: the store's open waits on it.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let silent_addr = silent.local_addr().unwrap();
    let dirs = ControlDirs::new();
    let mut child = std::process::Command::new(outrider_e2e::control_binary())
        .arg("serve")
        .arg("--policies")
        .arg(&dirs.policies)
        .arg("--store")
        .arg(format!("etcd://{silent_addr}"))
        .args(["--etcd-timeout", "3s", "--listen", "127.0.0.1:0"])
        .arg("--token-file")
        .arg(&dirs.token_file)
        .env_remove("OUTRIDER_CONTROL_TOKEN")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("spawn outrider-control");
    // Its first connection to the store shows it is past the runtime's start, opening the store.
    silent.set_nonblocking(true).unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    let _held = loop {
        match silent.accept() {
            Ok((stream, _)) => break stream,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                assert!(
                    Instant::now() < deadline,
                    "outrider-control never reached the store"
                );
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            Err(e) => panic!("accept: {e}"),
        }
    };
    let status = std::process::Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        assert!(Instant::now() < deadline, "outrider-control did not exit");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(
        status.signal(),
        None,
        "killed by signal {:?} while the store opened: the handlers were not installed yet",
        status.signal()
    );
    assert_eq!(status.code(), Some(69), "etcd out of reach: EX_UNAVAILABLE");
}
