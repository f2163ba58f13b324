//! Registrations bound to the proxy's identity, end to end: with service-account binding on
//! (`--sa-jwks`), a real proxy started with `--register pay` and the `pay` service account's
//! token (`--identity-token-file`) registers; a registration of `pay` with the control-plane
//! token alone, or with another service account's token, is refused (403, naming both);
//! one with `pay`'s token is taken.

#![allow(clippy::unwrap_used, missing_docs)]

use std::time::Duration;

use outrider_config::wire::{REGISTER_PATH, SERVICE_ACCOUNT_TOKEN_HEADER};
use outrider_e2e::control::{start_control_with, Control, ControlDirs, CONTROL_TOKEN};
use outrider_e2e::prometheus::{promtool_check, sample};
use outrider_e2e::service_account::TokenIssuer;
use outrider_e2e::*;

/// `control`'s `outrider_control_registered_endpoints{service="pay"}` (0 when absent).
async fn pay_endpoints(control: &Control) -> f64 {
    let reply = control
        .request_with_token("GET", "/metrics", "", None)
        .await;
    let text = String::from_utf8(reply.body.to_vec()).unwrap();
    promtool_check(&text);
    sample(
        &text,
        "outrider_control_registered_endpoints{service=\"pay\"}",
    )
    .unwrap_or(0.0)
}

/// `POST /v1/register` of `pay` at `address` as `proxy`, with the service-account token read
/// from `sa_token` when given: the status and the answer.
async fn register(
    control: &Control,
    proxy: &str,
    address: &str,
    sa_token: Option<&std::ffi::OsString>,
) -> (u16, String) {
    let body = serde_json::json!({"proxy": proxy, "services": ["pay"], "address": address});
    let mut req = http::Request::post(format!("{}{REGISTER_PATH}", control.url()))
        .header("authorization", format!("Bearer {CONTROL_TOKEN}"));
    if let Some(path) = sa_token {
        let token = std::fs::read_to_string(path).unwrap();
        req = req.header(SERVICE_ACCOUNT_TOKEN_HEADER, token.trim());
    }
    let req = req.body(full(body.to_string())).unwrap();
    let reply = tokio::time::timeout(Duration::from_secs(10), send(&http1_client(), req))
        .await
        .expect("an answer within 10s");
    (
        reply.status,
        String::from_utf8_lossy(&reply.body).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_service_account_binding_a_proxy_registers_only_as_its_own_workload() {
    let issuer = TokenIssuer::new();
    let app = Upstream::echo(Proto::Http1, "pay").await;
    let dirs = ControlDirs::new();
    dirs.write(
        "pay.yaml",
        &format!("workload: pay\ninbound: {{ app: {} }}\n", app.addr),
    );
    let mut flags: Vec<String> = issuer.control_flags().to_vec();
    flags.extend(["--registration-ttl".into(), "2s".into()]);
    let control = start_control_with(&dirs, &flags.iter().map(String::as_str).collect::<Vec<_>>());
    let pay_token = issuer.token_file("shop", "pay", "outrider", 3600);
    let orders_token = issuer.token_file("shop", "orders", "outrider", 3600);

    // The real proxy of workload `pay`, with its service account's token: registered.
    let mut args = control.proxy_flags(&dirs, "pay");
    args.extend(
        [
            "--proxy-id",
            "pay-1",
            "--register",
            "pay",
            "--identity-token-file",
        ]
        .iter()
        .map(Into::into),
    );
    args.push(pay_token.clone());
    let proxy = spawn_proxy(TempDir::new(), &args);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    while pay_endpoints(&control).await != 1.0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "pay-1 never registered; proxy logs:\n{}\ncontrol logs:\n{}",
            proxy.logs().join("\n"),
            control.logs().join("\n")
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // The control-plane token alone: refused.
    let (status, answer) = register(&control, "rogue", "127.0.0.1:7001", None).await;
    assert_eq!(status, 403, "{answer}");
    // Another workload's service account: refused, naming both.
    let (status, answer) = register(&control, "rogue", "127.0.0.1:7001", Some(&orders_token)).await;
    assert_eq!(status, 403, "{answer}");
    assert!(
        answer.contains("orders") && answer.contains("pay"),
        "{answer}"
    );
    assert_eq!(pay_endpoints(&control).await, 1.0);
    // `pay`'s own: taken.
    let (status, answer) = register(&control, "pay-2", "127.0.0.1:7002", Some(&pay_token)).await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(pay_endpoints(&control).await, 2.0);
}
