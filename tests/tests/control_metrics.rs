//! The control plane's `/metrics` end to end: the real `outrider-control` and a real
//! `outrider-proxy` subscribed to it; applies, rejections, ACKs and certificates move the
//! series, and the exposition passes `promtool check metrics`.

#![allow(clippy::unwrap_used, missing_docs)]

use std::time::Duration;

use outrider_e2e::control::{start_control, Control, ControlDirs};
use outrider_e2e::prometheus::{promtool_check, sample};
use outrider_e2e::{spawn_proxy, Proxy, TempDir};

/// The control plane's exposition.
async fn scrape(control: &Control) -> String {
    let reply = control
        .request_with_token("GET", "/metrics", "", None)
        .await;
    assert_eq!(reply.status, 200);
    assert_eq!(
        reply.header("content-type"),
        Some("text/plain; version=0.0.4; charset=utf-8")
    );
    String::from_utf8(reply.body.to_vec()).unwrap()
}

/// Waits (at most 10 s) until `series` reads `expected`, and returns the exposition.
async fn settles(control: &Control, series: &str, expected: f64) -> String {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let text = scrape(control).await;
        if sample(&text, series) == Some(expected) {
            return text;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{series} never read {expected} (now {:?}); exposition:\n{text}",
            sample(&text, series)
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn start_checkout(control: &Control, dirs: &ControlDirs) -> Proxy {
    let args: Vec<std::ffi::OsString> = [
        "--control",
        &control.url(),
        "--token-file",
        dirs.token_file.to_str().unwrap(),
        "--workload",
        "checkout",
        "--namespace",
        "shop",
        "--service-account",
        "checkout",
    ]
    .iter()
    .map(Into::into)
    .collect();
    spawn_proxy(TempDir::new(), &args)
}

const CHECKOUT: &str = "workload: checkout\nservices:\n  cart: { endpoints: [127.0.0.1:9201] }\nroutes:\n  - { match: { authority: cart }, service: cart }\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn applies_acks_rejections_and_certificates_move_the_control_plane_metrics() {
    let dirs = ControlDirs::new();
    let control = start_control(&dirs);
    let fresh = scrape(&control).await;
    promtool_check(&fresh);
    let m = |name: &str, labels: &str| format!("{name}{{{labels}}}");
    let applies = |result: &str| {
        m(
            "outrider_control_applies_total",
            &format!("result=\"{result}\",source=\"api\""),
        )
    };
    let rejections = |reason: &str| {
        m(
            "outrider_control_rejections_total",
            &format!("reason=\"{reason}\",source=\"api\""),
        )
    };
    // Every bounded series is there from the start, at zero.
    assert_eq!(sample(&fresh, &applies("accepted")), Some(0.0));
    assert_eq!(sample(&fresh, &rejections("conflict")), Some(0.0));
    assert_eq!(
        sample(&fresh, "outrider_control_push_latency_seconds_count"),
        Some(0.0)
    );
    assert_eq!(
        sample(
            &fresh,
            "outrider_control_store_operation_duration_seconds_count{op=\"load\"}"
        ),
        Some(1.0)
    );
    assert!(
        sample(&fresh, "outrider_control_ca_expiry_timestamp_seconds").unwrap() > 1.7e9,
        "{fresh}"
    );

    // A proxy with a service account: subscribed, and certified.
    let proxy = start_checkout(&control, &dirs);
    let in_sync = m(
        "outrider_control_proxies",
        "state=\"in-sync\",workload=\"checkout\"",
    );
    settles(&control, &in_sync, 1.0).await;
    let text = settles(&control, "outrider_control_certificates_issued_total", 1.0).await;
    // Its initial sync is no push of a change: no latency yet.
    assert_eq!(
        sample(&text, "outrider_control_push_latency_seconds_count"),
        Some(0.0)
    );
    assert_eq!(
        sample(
            &text,
            "outrider_control_proxies{state=\"pending\",workload=\"checkout\"}"
        ),
        Some(0.0)
    );

    // An apply: a version, pushed and ACKed, its latency observed.
    let reply = control
        .request("POST", "/v1/apply?name=checkout", CHECKOUT)
        .await;
    assert_eq!(
        reply.status,
        200,
        "{}",
        String::from_utf8_lossy(&reply.body)
    );
    let version = reply.json()["version"].as_u64().unwrap();
    let text = settles(&control, "outrider_control_push_latency_seconds_count", 1.0).await;
    let latency = sample(&text, "outrider_control_push_latency_seconds_sum").unwrap();
    assert!(latency > 0.0 && latency < 10.0, "{latency}");
    assert_eq!(sample(&text, &applies("accepted")), Some(1.0));
    assert_eq!(
        sample(&text, "outrider_control_versions_total{cause=\"apply\"}"),
        Some(1.0)
    );
    assert_eq!(
        sample(&text, "outrider_control_version"),
        Some(version as f64)
    );
    assert_eq!(
        sample(
            &text,
            "outrider_control_workload_version{workload=\"checkout\"}"
        ),
        Some(version as f64)
    );
    assert_eq!(
        sample(
            &text,
            "outrider_control_workload_applied_version_min{workload=\"checkout\"}"
        ),
        Some(version as f64)
    );
    assert_eq!(sample(&text, &in_sync), Some(1.0));
    assert!(sample(&text, "outrider_control_acks_total{result=\"ack\"}").unwrap() >= 2.0);
    assert!(
        sample(
            &text,
            "outrider_control_store_operation_duration_seconds_count{op=\"save\"}"
        )
        .unwrap()
            >= 1.0
    );

    // The same document again: unchanged, no version.
    let reply = control
        .request("POST", "/v1/apply?name=checkout", CHECKOUT)
        .await;
    assert_eq!(reply.status, 200);
    settles(&control, &applies("unchanged"), 1.0).await;

    // An invalid document and a conflicting one: rejected, each with its reason.
    let reply = control
        .request(
            "POST",
            "/v1/apply?name=broken",
            "workload: checkout\nroutes:\n  - { match: { authority: cart }, service: kart }\n",
        )
        .await;
    assert_eq!(reply.status, 422);
    let text = settles(&control, &rejections("invalid"), 1.0).await;
    assert_eq!(sample(&text, &rejections("conflict")), Some(0.0));
    let reply = control
        .request("POST", "/v1/apply?name=twin", CHECKOUT)
        .await;
    assert_eq!(
        reply.status,
        422,
        "{}",
        String::from_utf8_lossy(&reply.body)
    );
    let text = settles(&control, &rejections("conflict"), 1.0).await;
    assert_eq!(sample(&text, &applies("rejected")), Some(2.0));
    assert_eq!(sample(&text, &applies("accepted")), Some(1.0));
    assert_eq!(
        sample(&text, "outrider_control_version"),
        Some(version as f64)
    );

    // Certificate requests refused: not JSON, then a bad identity.
    let reply = control.request("POST", "/v1/certificate", "{").await;
    assert_eq!(reply.status, 400);
    settles(
        &control,
        "outrider_control_certificate_failures_total{reason=\"malformed\"}",
        1.0,
    )
    .await;
    let reply = control
        .request(
            "POST",
            "/v1/certificate",
            r#"{"namespace":"Not_A_Label","service_account":"x","csr":""}"#,
        )
        .await;
    assert_eq!(
        reply.status,
        400,
        "{}",
        String::from_utf8_lossy(&reply.body)
    );
    let text = settles(
        &control,
        "outrider_control_certificate_failures_total{reason=\"identity\"}",
        1.0,
    )
    .await;
    assert_eq!(
        sample(&text, "outrider_control_certificates_issued_total"),
        Some(1.0)
    );

    // The proxy gone: its record says so until it expires.
    drop(proxy);
    let text = settles(
        &control,
        "outrider_control_proxies{state=\"disconnected\",workload=\"checkout\"}",
        1.0,
    )
    .await;
    assert_eq!(sample(&text, &in_sync), Some(0.0));
    promtool_check(&text);
}
