//! The policy's JSON Schema as the real `outrider-control` binary serves it: open without a
//! token (an editor fetches it), `application/schema+json`, and byte for byte the document
//! checked in at `deploy/schema/policy.json` and printed by `outriderctl schema`.

#![allow(clippy::unwrap_used, missing_docs)]

use outrider_e2e::control::ctl;
use outrider_e2e::{start_control, ControlDirs};

const PATH: &str = "/v1/schema/policy.json";

fn checked_in() -> String {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/schema/policy.json");
    std::fs::read_to_string(path).unwrap()
}

#[tokio::test]
async fn the_control_plane_serves_the_checked_in_schema_without_a_token() {
    let dirs = ControlDirs::new();
    dirs.write("defaults.yaml", "workload: \"*\"\nservices: {}\n");
    let control = start_control(&dirs);

    let reply = control.request_with_token("GET", PATH, "", None).await;
    assert_eq!(reply.status, 200, "{:?}", reply.body);
    assert_eq!(
        reply.header("content-type"),
        Some("application/schema+json")
    );
    let served = String::from_utf8(reply.body.to_vec()).unwrap();
    assert!(
        served == checked_in(),
        "the served schema differs from deploy/schema/policy.json"
    );
    let schema = reply.json();
    assert_eq!(schema["$schema"], "http://json-schema.org/draft-07/schema#");
    assert_eq!(schema["additionalProperties"], false);
    assert!(schema["definitions"]["Route"]["properties"]["matches"].is_object());

    // Served twice, the same (generated once per process).
    let again = control.request("GET", PATH, "").await;
    assert_eq!(again.body, reply.body);
    // Read-only.
    let post = control.request("POST", PATH, "{}").await;
    assert_eq!(post.status, 405);
}

#[test]
fn outriderctl_schema_prints_the_checked_in_schema() {
    // Offline: no control plane at this address, and none needed.
    let out = ctl("http://127.0.0.1:9", None, &["schema"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        String::from_utf8(out.stdout).unwrap() == checked_in(),
        "`outriderctl schema` differs from deploy/schema/policy.json"
    );
}
