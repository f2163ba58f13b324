//! `load_balancing: { hash: ... }` through the real proxy binary against five real upstreams
//! on 127.0.0.1: each user id (a header, or a cookie) sticks to one endpoint across repeated
//! requests; when a reload removes one endpoint, its users move and (nearly) nobody else does;
//! requests without the key are still spread over every endpoint.

#![allow(clippy::unwrap_used, missing_docs)]

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::time::{Duration, Instant};

use http::Request;
use outrider_e2e::*;
use tokio::time::timeout;

/// Bound on every single await of a test.
const STEP: Duration = Duration::from_secs(10);
const USERS: usize = 200;
const NAMES: [&str; 5] = ["e0", "e1", "e2", "e3", "e4"];

fn policy(servers: &[&Upstream], hash_on: &str) -> String {
    let endpoints: Vec<String> = servers.iter().map(|s| s.addr.to_string()).collect();
    format!(
        "services:
  shop:
    endpoints: [{}]
    load_balancing: {{ hash: {{ {hash_on} }} }}
routes:
  - {{ match: {{ authority: shop }}, service: shop }}
",
        endpoints.join(", ")
    )
}

fn save(path: &Path, text: &str) {
    let tmp = path.with_extension("yaml.swp");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

async fn wait_version(proxy: &Proxy, version: u64) {
    let deadline = Instant::now() + STEP;
    loop {
        let (_, body) = proxy.admin_get("/config").await;
        let config: serde_json::Value = serde_json::from_str(&body).unwrap();
        if config["version"].as_u64() == Some(version) {
            return;
        }
        assert!(Instant::now() < deadline, "version {version} never applied");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The upstream that served a request carrying `header` (if any).
async fn served_by(proxy: &Proxy, header: Option<(&str, &str)>) -> String {
    let mut req = Request::get(format!("http://{}/", proxy.outbound)).header("host", "shop");
    if let Some((name, value)) = header {
        req = req.header(name, value);
    }
    let reply = timeout(STEP, send(&http1_client(), req.body(empty()).unwrap()))
        .await
        .unwrap();
    assert_eq!(reply.status, 200);
    reply.json()["server"].as_str().unwrap().to_string()
}

/// Where each user lands, asked three times: always the same endpoint.
async fn homes(proxy: &Proxy, header: &str, value: impl Fn(usize) -> String) -> Vec<String> {
    let mut homes = Vec::with_capacity(USERS);
    for user in 0..USERS {
        let value = value(user);
        let first = served_by(proxy, Some((header, &value))).await;
        for _ in 0..2 {
            assert_eq!(
                served_by(proxy, Some((header, &value))).await,
                first,
                "user {user} moved without any change"
            );
        }
        homes.push(first);
    }
    homes
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn users_stick_to_an_endpoint_and_only_a_removed_endpoints_users_move() {
    let mut servers = Vec::new();
    for name in NAMES {
        servers.push(Upstream::echo(Proto::Http1, name).await);
    }
    let all: Vec<&Upstream> = servers.iter().collect();
    let proxy = start_proxy(&policy(&all, "header: x-user-id"));
    let user = |i: usize| format!("user-{i}");
    let before = homes(&proxy, "x-user-id", user).await;
    let mut load: HashMap<&str, usize> = HashMap::new();
    for home in &before {
        *load.entry(home.as_str()).or_default() += 1;
    }
    // 40 each expected (binomial sd about 5.7): every endpoint has at least 10.
    assert_eq!(load.len(), 5, "{load:?}");
    assert!(load.values().all(|&n| n >= 10), "{load:?}");

    // Without the header: round robin over all five.
    let mut keyless = HashSet::new();
    for _ in 0..10 {
        keyless.insert(served_by(&proxy, None).await);
    }
    assert_eq!(keyless.len(), 5, "{keyless:?}");

    // A reload removes e2.
    let removed = "e2";
    let rest: Vec<&Upstream> = servers
        .iter()
        .zip(NAMES)
        .filter(|(_, name)| *name != removed)
        .map(|(s, _)| s)
        .collect();
    save(&proxy.policy_path(), &policy(&rest, "header: x-user-id"));
    wait_version(&proxy, 2).await;
    let after = homes(&proxy, "x-user-id", user).await;

    let moved: Vec<usize> = (0..USERS).filter(|&i| before[i] != after[i]).collect();
    let on_removed = before.iter().filter(|h| *h == removed).count();
    let moved_elsewhere: Vec<usize> = moved
        .iter()
        .copied()
        .filter(|&i| before[i] != removed)
        .collect();
    eprintln!(
        "{} of {USERS} users moved; {on_removed} were on {removed}; {} from another endpoint",
        moved.len(),
        moved_elsewhere.len()
    );
    assert!(after.iter().all(|h| h != removed));
    // Every user of e2 had to move. Of the other ~160, Maglev moves about 0.1% (0.16 users
    // expected): up to 3 are allowed (a chance of about 3e-5 of more).
    assert!(moved_elsewhere.len() <= 3, "{moved_elsewhere:?}");
    // So at most a fifth plus slack: 40 expected on e2 (sd 5.7); 70 is 5 sd away.
    assert!(moved.len() <= USERS / 5 + 30, "{} moved", moved.len());
    // e2's users spread over the others rather than all landing on one.
    let heirs: HashSet<&String> = moved.iter().map(|&i| &after[i]).collect();
    assert!(heirs.len() >= 3, "{heirs:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cookie_is_a_key_too() {
    let mut servers = Vec::new();
    for name in NAMES {
        servers.push(Upstream::echo(Proto::Http1, name).await);
    }
    let all: Vec<&Upstream> = servers.iter().collect();
    let proxy = start_proxy(&policy(&all, "cookie: session"));
    let cookie = |i: usize| format!("theme=dark; session=s{i}");
    let homes = homes(&proxy, "cookie", cookie).await;
    let spread: HashSet<&String> = homes.iter().collect();
    assert_eq!(spread.len(), 5, "200 sessions reach every endpoint");
}
