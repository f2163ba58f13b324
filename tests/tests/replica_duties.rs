//! What replicas on etcd do for each other, end to end: a real 3-member etcd cluster
//! (Debian's `etcd-server`), three real `outrider-control` replicas sharing one policy
//! directory (as they share a ConfigMap), real proxies. Exactly one replica leads and only it
//! imports the directory; when the leader is killed (SIGKILL) right after an edit, leadership
//! moves within the lease TTL and the edit becomes exactly one version, seen by every replica;
//! killing the next leader, which did import it, imports nothing again. `status` on any replica
//! lists a proxy connected to another, and a killed replica's proxies leave it within the
//! lease TTL; a leader stopped by SIGTERM hands over sooner than its lease would expire.
//! Skipped when etcd is not installed, unless OUTRIDER_REQUIRE_ETCD=1.

#![allow(clippy::unwrap_used, missing_docs)]

use std::time::{Duration, Instant};

use outrider_e2e::control::{start_control_with, Control, ControlDirs};
use outrider_e2e::etcd::EtcdCluster;
use outrider_e2e::*;

/// The replicas' lease TTL: etcd's shortest with the cluster's 1 s election timeout.
const LEASE_TTL: Duration = Duration::from_secs(2);
/// What leadership's move, or a dead replica's proxies' disappearance, may take past the TTL:
/// etcd checks for expired leases every 500 ms, then the next candidate is told; the rest is
/// room for a loaded machine.
const HANDOVER_SLACK: Duration = Duration::from_secs(3);

/// Replica `name` on `cluster`, over the shared `dirs` (policy directory and token).
fn replica(cluster: &EtcdCluster, dirs: &ControlDirs, name: &str) -> Control {
    let url = cluster.url();
    start_control_with(
        dirs,
        &[
            "--store",
            &url,
            "--etcd-timeout",
            "5s",
            "--lease-ttl",
            "2s",
            "--replica-name",
            name,
        ],
    )
}

/// `/ready`'s body.
async fn ready(control: &Control) -> String {
    let reply = control.request_with_token("GET", "/ready", "", None).await;
    assert_eq!(reply.status, 200);
    String::from_utf8_lossy(&reply.body).into_owned()
}

/// Waits until exactly one of `replicas` says it leads; returns its index.
async fn the_leader(replicas: &[&Control], within: Duration) -> usize {
    let started = Instant::now();
    loop {
        let mut leading = Vec::new();
        for (i, replica) in replicas.iter().enumerate() {
            let body = ready(replica).await;
            assert!(
                body.contains("leader=true") || body.contains("leader=false"),
                "{body}"
            );
            if body.contains("leader=true") {
                leading.push(i);
            }
        }
        assert!(leading.len() <= 1, "two leaders at once: {leading:?}");
        if let [one] = leading[..] {
            return one;
        }
        assert!(
            started.elapsed() < within,
            "no leader within {within:?}; logs:\n{}",
            replicas
                .iter()
                .map(|r| r.logs().join("\n"))
                .collect::<Vec<_>>()
                .join("\n--\n")
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The versions a replica's history holds, newest first, with the newest one's cause.
async fn versions(control: &Control) -> (Vec<u64>, String) {
    let reply = control.request("GET", "/v1/history", "").await;
    assert_eq!(reply.status, 200);
    let history = reply.json();
    let versions = history
        .as_array()
        .unwrap()
        .iter()
        .map(|h| h["version"].as_u64().unwrap())
        .collect();
    let cause = history[0]["cause"].as_str().unwrap_or_default().to_string();
    (versions, cause)
}

/// Waits until `control`'s history is `expected` (newest first) and workload `w`'s policy
/// holds `needle`.
async fn wait_for(control: &Control, expected: &[u64], needle: &str) {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let (have, _) = versions(control).await;
        let policy = control.request("GET", "/v1/policy?workload=w", "").await;
        let policy = policy.json()["policy"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        if have == expected && policy.contains(needle) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "history {have:?} (expected {expected:?}), policy {policy}; logs:\n{}",
            control.logs().join("\n")
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The replicas still running (by index) and their controls.
fn leader_of(replicas: &[Option<Control>]) -> (Vec<usize>, Vec<&Control>) {
    replicas
        .iter()
        .enumerate()
        .filter_map(|(i, r)| r.as_ref().map(|r| (i, r)))
        .unzip()
}

fn doc(port: u16) -> String {
    format!("workload: w\nservices:\n  up: {{ endpoints: [127.0.0.1:{port}] }}\n")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_leader_alone_imports_and_an_edit_at_its_death_becomes_one_version() {
    let Some(cluster) = EtcdCluster::start(3) else {
        return;
    };
    let dirs = ControlDirs::new();
    let mut replicas: Vec<Option<Control>> = ["r0", "r1", "r2"]
        .iter()
        .map(|name| Some(replica(&cluster, &dirs, name)))
        .collect();
    // One leader; the directory's first document is one version on every replica.
    let (alive, controls) = leader_of(&replicas);
    let first = alive[the_leader(&controls, Duration::from_secs(15)).await];
    dirs.write("a.yaml", &doc(1001));
    for control in &controls {
        wait_for(control, &[1], "1001").await;
    }

    // An edit, then the leader's death before it could import it (a scan waits 100 ms for
    // the files to hold still): leadership moves within the lease TTL, and the new leader
    // imports the edit once.
    dirs.write("a.yaml", &doc(1002));
    replicas[first].take().unwrap().kill();
    let killed = Instant::now();
    let (alive, controls) = leader_of(&replicas);
    let second = alive[the_leader(&controls, LEASE_TTL + HANDOVER_SLACK).await];
    let handover = killed.elapsed();
    eprintln!("leadership moved {handover:?} after the leader's SIGKILL (lease TTL {LEASE_TTL:?})");
    assert!(handover < LEASE_TTL + HANDOVER_SLACK, "{handover:?}");
    let new_leader = replicas[second].as_ref().unwrap();
    assert!(
        new_leader.wait_log(Duration::from_secs(10), |l| l
            .contains("leader's import of the policy directory done")),
        "{}",
        new_leader.logs().join("\n")
    );
    for control in &controls {
        wait_for(control, &[2, 1], "1002").await;
        assert_eq!(versions(control).await.1, "files changed: a.yaml");
    }

    // The leader that imported it dies too: the last replica leads, finds the directory
    // already in the store, and imports nothing.
    replicas[second].take().unwrap().kill();
    let (alive, controls) = leader_of(&replicas);
    let third = alive[the_leader(&controls, LEASE_TTL + HANDOVER_SLACK).await];
    let last = replicas[third].as_ref().unwrap();
    assert!(
        last.wait_log(Duration::from_secs(10), |l| l
            .contains("leader's import of the policy directory done")),
        "{}",
        last.logs().join("\n")
    );
    assert_eq!(versions(last).await.0, [2, 1]);
    // And it imports the next edit.
    dirs.write("a.yaml", &doc(1003));
    wait_for(last, &[3, 2, 1], "1003").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_on_any_replica_lists_every_proxy_until_its_replica_dies() {
    let Some(cluster) = EtcdCluster::start(3) else {
        return;
    };
    let dirs = ControlDirs::new();
    dirs.write("checkout.yaml", "workload: checkout\nservices: {}\n");
    let r1 = replica(&cluster, &dirs, "r1");
    let r2 = replica(&cluster, &dirs, "r2");
    let r3 = replica(&cluster, &dirs, "r3");
    let proxy = spawn_proxy(TempDir::new(), &r3.proxy_flags(&dirs, "checkout"));

    // Listed by replica 1, as connected to replica 3, and in sync.
    let listed = |status: &serde_json::Value| -> Vec<(String, String, String)> {
        status["proxies"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| {
                (
                    p["workload"].as_str().unwrap_or_default().to_string(),
                    p["replica"].as_str().unwrap_or_default().to_string(),
                    p["state"].as_str().unwrap_or_default().to_string(),
                )
            })
            .collect()
    };
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let status = r1.status().await;
        if listed(&status) == [("checkout".into(), "r3".into(), "in-sync".into())] {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{status}\nproxy:\n{}",
            proxy.logs().join("\n")
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let out = r1.ctl(&["status"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    assert!(text.contains("replica r1: leader: "), "{text}");
    let row = text
        .lines()
        .find(|l| l.contains("checkout"))
        .unwrap_or_else(|| panic!("{text}"));
    assert!(row.contains("in-sync") && row.ends_with("r3"), "{text}");

    // Replica 3 dies: its proxies leave replica 1's status within the lease TTL.
    r3.kill();
    let killed = Instant::now();
    while !listed(&r1.status().await).is_empty() {
        assert!(
            killed.elapsed() < LEASE_TTL + HANDOVER_SLACK,
            "{:?}",
            r1.status().await
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    eprintln!(
        "a killed replica's proxies left status {:?} after its SIGKILL (lease TTL {LEASE_TTL:?})",
        killed.elapsed()
    );

    // The leader stopped in order (SIGTERM) revokes its lease: the other leads sooner than
    // the lease could have expired (two thirds of the TTL at least after the last keep-alive).
    let both = [&r1, &r2];
    let leader = the_leader(&both, LEASE_TTL + HANDOVER_SLACK).await;
    let other = both[1 - leader];
    both[leader].terminate();
    let stopped = Instant::now();
    the_leader(&[other], Duration::from_secs(1)).await;
    eprintln!(
        "leadership moved {:?} after the leader's SIGTERM",
        stopped.elapsed()
    );
}
