//! The engine's unit tests: changes, files, deletes, rollbacks, expiry, status.

use std::collections::{BTreeMap, BTreeSet};

use outrider_config::wire::Ack;

use super::*;

struct Dir(std::path::PathBuf);
impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn engine(tag: &str) -> (Engine, Dir) {
    let dir = std::env::temp_dir().join(format!("outrider-engine-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let store = Store::open(&dir).expect("store");
    (Engine::open(store).expect("engine"), Dir(dir))
}

/// What `expire` returns when it forgot `proxies` proxies and `workloads` workloads.
fn forgot(proxies: usize, workloads: usize) -> Forgotten {
    Forgotten { proxies, workloads }
}

fn upsert(name: &str, text: &str) -> Change {
    Change::Upsert {
        name: name.into(),
        text: text.into(),
        source: Source::Api,
        force: false,
    }
}

#[test]
fn reads_subscriptions_and_acks_do_not_wait_for_the_disk() {
    use std::sync::mpsc;
    use std::time::Duration;
    let dir = std::env::temp_dir().join(format!("outrider-engine-slowdisk-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let _cleanup = Dir(dir.clone());
    let mut store = Store::open(&dir).expect("store");
    let (entered_tx, entered) = mpsc::sync_channel(1);
    let (release, release_rx) = mpsc::channel();
    store.gate = Some(Arc::new(crate::store::SaveGate {
        entered: entered_tx,
        release: Mutex::new(release_rx),
    }));
    let engine = Arc::new(Engine::open(store).expect("engine"));
    let doc = "workload: checkout\nservices: { a: { endpoints: [127.0.0.1:1] } }\n";
    let writer = {
        let engine = Arc::clone(&engine);
        std::thread::spawn(move || engine.apply(vec![upsert("checkout", doc)], "t"))
    };
    entered
        .recv_timeout(Duration::from_secs(10))
        .expect("the save started");
    // The new state is being written: readers, subscribers and ACKs are answered at once,
    // and still see the version in force.
    let (answered_tx, answered) = mpsc::channel();
    {
        let engine = Arc::clone(&engine);
        std::thread::spawn(move || {
            let version = engine.version();
            let policy = engine.subscribe("checkout").borrow().version;
            let session = engine
                .connect("p1", "checkout", None, None)
                .expect("session");
            engine.sent("p1", session.connection, 0, "");
            let status = engine.status();
            let _ = answered_tx.send((version, policy, status.proxies.len()));
        });
    }
    let seen = answered.recv_timeout(Duration::from_secs(5));
    release.send(()).expect("writer waits");
    assert_eq!(seen, Ok((0, 0, 1)), "reads waited for the disk");
    let outcome = writer.join().expect("writer").expect("applied");
    assert_eq!(outcome.version, 1);
    assert_eq!(engine.version(), 1);
    assert_eq!(engine.subscribe("checkout").borrow().version, 1);
}

#[test]
fn a_change_whose_deadline_passed_behind_another_is_not_made() {
    use std::sync::mpsc;
    use std::time::Duration;
    let dir = std::env::temp_dir().join(format!("outrider-engine-deadline-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let _cleanup = Dir(dir.clone());
    let mut store = Store::open(&dir).expect("store");
    let (entered_tx, entered) = mpsc::sync_channel(2);
    let (release, release_rx) = mpsc::channel();
    store.gate = Some(Arc::new(crate::store::SaveGate {
        entered: entered_tx,
        release: Mutex::new(release_rx),
    }));
    let engine = Arc::new(Engine::open(store).expect("engine"));
    let first = {
        let engine = Arc::clone(&engine);
        std::thread::spawn(move || engine.apply(vec![upsert("a", "services: {}\n")], "first"))
    };
    entered
        .recv_timeout(Duration::from_secs(10))
        .expect("the first save started");
    // A second change with a 50 ms deadline waits behind the first, which takes longer.
    let second = {
        let engine = Arc::clone(&engine);
        std::thread::spawn(move || {
            let deadline = Instant::now() + Duration::from_millis(50);
            engine.apply_by(
                vec![upsert(
                    "b",
                    "services: { x: { endpoints: [127.0.0.1:1] } }\n",
                )],
                "second",
                Some(deadline),
            )
        })
    };
    std::thread::sleep(Duration::from_millis(100));
    release.send(()).expect("first waits");
    assert_eq!(first.join().expect("first").expect("applied").version, 1);
    let second = second.join().expect("second");
    assert!(matches!(second, Err(EngineError::Expired)), "{second:?}");
    assert_eq!(engine.version(), 1);
    assert_eq!(engine.history().len(), 1);
}

#[test]
fn bad_document_is_rejected_and_the_others_go_out() {
    let (engine, dir) = engine("reject");
    let checkout = engine.subscribe("checkout");
    let good = "workload: checkout\nservices: { a: { endpoints: [127.0.0.1:1] } }\n";
    let out = engine
        .apply(
            vec![
                upsert("good", good),
                upsert("bad", "routes:\n  - service: nope\n"),
            ],
            "t",
        )
        .expect("applied");
    assert_eq!(out.version, 1);
    assert_eq!(out.accepted, ["good"]);
    assert_eq!(out.rejected.len(), 1);
    assert!(
        out.rejected[0].message.contains("at bad:2:"),
        "{:?}",
        out.rejected
    );
    assert_eq!(checkout.borrow().version, 1);
    assert!(checkout.borrow().policy.contains("127.0.0.1:1"));

    // The same text again: no version.
    let out = engine
        .apply(vec![upsert("good", good)], "t")
        .expect("applied");
    assert_eq!((out.version, out.unchanged.len()), (1, 1));

    // A change that does not touch checkout: version 2, checkout stays at 1.
    let other = "workload: search\nservices: { s: { endpoints: [127.0.0.1:5] } }\n";
    engine
        .apply(vec![upsert("other", other)], "t")
        .expect("applied");
    assert_eq!(engine.policy("checkout").version, 1);
    assert_eq!(engine.policy("search").version, 2);

    // Restart: everything kept, each workload at the version its policy last changed.
    drop(engine);
    let engine = Engine::open(Store::open(&dir.0).expect("store")).expect("reopen");
    assert_eq!(engine.version(), 2);
    let checkout = engine.policy("checkout");
    assert!(checkout.policy.contains("127.0.0.1:1"));
    assert_eq!(checkout.version, 1);
    assert_eq!(engine.policy("search").version, 2);
}

#[test]
fn conflict_rejects_the_later_document_naming_both() {
    let (engine, _dir) = engine("conflict");
    let a = "workload: w\nservices: { x: { endpoints: [127.0.0.1:1] } }\n";
    let b = "workload: [v, w]\nservices: { x: { endpoints: [127.0.0.1:2] } }\n";
    engine.apply(vec![upsert("a", a)], "t").expect("a");
    let out = engine.apply(vec![upsert("b", b)], "t").expect("b");
    assert!(out.accepted.is_empty());
    let message = &out.rejected[0].message;
    assert!(
        message.contains("`a`") && message.contains("`b`"),
        "{message}"
    );
    assert_eq!(engine.version(), 1);
}

#[test]
fn a_default_change_reaches_every_workload_and_rollback_restores() {
    let (engine, _dir) = engine("rollback");
    let w = engine.subscribe("w");
    let other = engine.subscribe("unnamed");
    let d1 = "services: { x: { endpoints: [127.0.0.1:1] } }\n";
    let d2 = "services: { x: { endpoints: [127.0.0.1:2] } }\n";
    let specific = "workload: w\nservices: { y: { endpoints: [127.0.0.1:3] } }\n";
    engine
        .apply(vec![upsert("d", d1), upsert("s", specific)], "t")
        .expect("1");
    let h1 = w.borrow().content_hash.clone();
    let out = engine.apply(vec![upsert("d", d2)], "t").expect("2");
    assert_eq!(out.version, 2);
    let names: Vec<&str> = out.workloads.iter().map(|w| w.workload.as_str()).collect();
    assert_eq!(names, ["*", "unnamed", "w"]);
    assert!(out.diffs["d"].contains("-services: { x: { endpoints: [127.0.0.1:1] } }"));
    assert!(other.borrow().policy.contains("127.0.0.1:2"));
    let out = engine.rollback(1).expect("rollback");
    assert_eq!(out.version, 3);
    assert_eq!(w.borrow().content_hash, h1);
    assert_eq!(w.borrow().version, 3);
    assert!(matches!(engine.rollback(99), Err(EngineError::NotKept(99))));
    let history = engine.history();
    assert_eq!(history[0].cause, "rollback to 1");
    assert_eq!(history.len(), 3);
}

fn service(name: &str, endpoints: u16) -> String {
    let endpoints: Vec<String> = (0..endpoints)
        .map(|p| format!("127.0.0.1:{}", 10_000 + p))
        .collect();
    format!("{name}: {{ endpoints: [{}] }}", endpoints.join(", "))
}

#[test]
fn delete_removes_an_applied_document_unless_what_remains_is_invalid() {
    // `d` defines a large `x` for everyone, `small` replaces it with a small one for `w`,
    // `big` gives `w` a large `y`: without `small`, `w`'s merged policy is too large to push.
    let d = format!("services: {{ {} }}\n", service("x", 40));
    let small = format!("workload: w\nservices: {{ {} }}\n", service("x", 1));
    let big = format!("workload: w\nservices: {{ {} }}\n", service("y", 40));
    let line = |docs: Vec<Change>| {
        let (engine, _dir) = engine("delete-measure");
        engine.apply(docs, "t").expect("applied");
        let line = engine.subscribe("w").borrow().line.len();
        line
    };
    let fits = line(vec![
        upsert("d", &d),
        upsert("small", &small),
        upsert("big", &big),
    ]);
    let too_large = line(vec![upsert("d", &d), upsert("big", &big)]);
    assert!(too_large > fits + 200, "{fits} {too_large}");

    let (engine, _dir) = engine("delete");
    let engine = engine.max_push(fits.midpoint(too_large));
    let w = engine.subscribe("w");
    engine
        .apply(
            vec![
                upsert("d", &d),
                upsert("small", &small),
                upsert("big", &big),
            ],
            "t",
        )
        .expect("1");
    let out = engine.delete("small", None).expect("answered");
    assert_eq!(out.version, 1);
    let message = &out.rejected[0].message;
    assert!(
        message.starts_with(
            "cannot delete small: the merged policy for workload `w` would be pushed as"
        ),
        "{message}"
    );
    assert_eq!(engine.version(), 1);

    let out = engine.delete("big", None).expect("deleted");
    assert_eq!(out.version, 2);
    assert_eq!(out.accepted, ["big"]);
    assert!(
        !w.borrow().policy.contains("10039"),
        "{}",
        w.borrow().policy
    );
    assert_eq!(w.borrow().version, 2);
    assert_eq!(engine.history()[0].cause, "delete big");
    assert_eq!(engine.history()[0].documents, ["d", "small"]);
    assert!(matches!(
        engine.delete("big", None),
        Err(EngineError::UnknownDocument(n)) if n == "big"
    ));
    let file = Change::Upsert {
        name: "f".into(),
        text: "workload: v\n".into(),
        source: Source::File,
        force: false,
    };
    engine.apply(vec![file], "t").expect("3");
    assert!(matches!(
        engine.delete("f", None),
        Err(EngineError::FileBacked(n)) if n == "f"
    ));
    assert_eq!(engine.version(), 3);
}

#[tokio::test(start_paused = true)]
async fn gone_proxies_and_workloads_expire_after_the_last_stream_closed() {
    use std::time::Duration;
    let after = Duration::from_secs(300);
    let (engine, _dir) = engine("expire");
    engine
        .apply(vec![upsert("named", "workload: kept\n")], "t")
        .expect("1");
    let published =
        |engine: &Engine| -> Vec<String> { engine.lock().published.keys().cloned().collect() };
    let proxies = |engine: &Engine| -> Vec<String> {
        engine
            .status()
            .proxies
            .into_iter()
            .map(|p| p.proxy)
            .collect()
    };
    let ghost = engine.subscribe("ghost");
    let ghost_session = engine
        .connect("p-ghost", "ghost", None, None)
        .expect("p-ghost");
    let _live = engine.subscribe("live");
    engine
        .connect("p-live", "live", None, None)
        .expect("p-live");
    // An unnamed workload only looked at, never subscribed: also forgotten.
    engine.policy("looked-at");
    assert_eq!(
        published(&engine),
        ["*", "ghost", "kept", "live", "looked-at"]
    );

    drop(ghost);
    engine.disconnected("p-ghost", ghost_session.connection);
    assert_eq!(engine.expire(after), forgot(0, 0));
    tokio::time::advance(after - Duration::from_secs(1)).await;
    assert_eq!(engine.expire(after), forgot(0, 0));
    assert_eq!(proxies(&engine), ["p-ghost", "p-live"]);
    tokio::time::advance(Duration::from_secs(1)).await;
    assert_eq!(engine.expire(after), forgot(1, 2));
    assert_eq!(proxies(&engine), ["p-live"]);
    assert_eq!(published(&engine), ["*", "kept", "live"]);
    // A forgotten workload subscribed again gets the policy in force (the defaults').
    assert_eq!(
        engine.policy("ghost").content_hash,
        engine.policy(DEFAULTS).content_hash
    );
    tokio::time::advance(after * 10).await;
    assert_eq!(engine.expire(after), forgot(0, 0));
}

#[tokio::test(start_paused = true)]
async fn the_sweeper_forgets_within_a_period_past_the_expiry() {
    use std::time::Duration;
    let after = Duration::from_secs(300);
    let (engine, _dir) = engine("sweeper");
    let engine = Arc::new(engine);
    let session = engine.connect("p", "w", None, None).expect("p");
    engine.disconnected("p", session.connection);
    drop(engine.subscribe("w"));
    let sweeper = tokio::spawn(expire_gone(Arc::clone(&engine), after));
    let known = |engine: &Engine| {
        let inner = engine.lock();
        (
            inner.proxies.iter().count(),
            inner.published.contains_key("w"),
        )
    };
    tokio::time::sleep(after - Duration::from_secs(1)).await;
    assert_eq!(known(&engine), (1, true));
    // Period: a quarter of 5 min, at most 30 s.
    tokio::time::sleep(Duration::from_secs(31)).await;
    assert_eq!(known(&engine), (0, false));
    sweeper.abort();
}

#[test]
fn files_sync_removes_deleted_and_retries_rejected() {
    let (engine, dir) = engine("files");
    let file = |text: &str| ScannedFile {
        text: text.into(),
        modified: std::time::SystemTime::UNIX_EPOCH,
    };
    let mut scan = BTreeMap::new();
    scan.insert(
        "a.yaml".to_string(),
        file("services: { x: { endpoints: [127.0.0.1:1] } }\n"),
    );
    scan.insert(
        "b.yaml".to_string(),
        file("services: { x: { endpoints: [127.0.0.1:2] } }\n"),
    );
    let out = engine
        .sync_files(scan.clone(), &BTreeSet::new())
        .expect("sync")
        .expect("changes");
    assert_eq!(out.accepted, ["a.yaml"]);
    assert_eq!(out.rejected[0].document, "b.yaml");
    scan.remove("a.yaml");
    let out = engine
        .sync_files(scan, &BTreeSet::new())
        .expect("sync")
        .expect("changes");
    // a.yaml deleted, and b.yaml no longer conflicts.
    assert_eq!(out.accepted, ["a.yaml", "b.yaml"]);
    assert!(engine.policy("*").policy.contains("127.0.0.1:2"));
    assert!(engine
        .status()
        .documents
        .iter()
        .all(|d| d.rejected.is_none()));

    // A rejected file that is deleted leaves status.
    let mut scan = BTreeMap::new();
    scan.insert("c.yaml".to_string(), file("services: [\n"));
    engine.sync_files(scan, &BTreeSet::new()).expect("sync");
    assert!(engine
        .status()
        .documents
        .iter()
        .any(|d| d.rejected.is_some()));
    engine
        .sync_files(BTreeMap::new(), &BTreeSet::new())
        .expect("sync");
    assert!(engine.status().documents.iter().all(|d| d.name != "c.yaml"));
    // Written as such, though no version was made.
    let reopened = Engine::open(Store::open(&dir.0).expect("store")).expect("engine");
    assert!(reopened.status().documents.is_empty());
}

#[test]
fn rejections_are_kept_in_the_store() {
    let (engine, dir) = engine("kept");
    let reopen = || Engine::open(Store::open(&dir.0).expect("store")).expect("engine");
    let rejected_docs = |engine: &Engine| -> Vec<String> {
        engine
            .status()
            .documents
            .into_iter()
            .filter(|d| d.rejected.is_some())
            .map(|d| d.name)
            .collect()
    };
    engine
        .apply(vec![upsert("good", "services: {}\n")], "t")
        .expect("1");
    // Rejected alone: recorded without a new version.
    for name in ["bad", "worse"] {
        let out = engine
            .apply(vec![upsert(name, "services: [\n")], "t")
            .expect("answered");
        assert_eq!(out.rejected.len(), 1);
    }
    let reopened = reopen();
    assert_eq!(rejected_docs(&reopened), ["bad", "worse"]);
    assert_eq!(reopened.version(), 1);
    let kept = reopened.status().documents;
    assert!(kept[0]
        .rejected
        .as_ref()
        .expect("bad")
        .message
        .contains("bad:"));
    // Accepted since: its rejection is gone with the version that took it.
    engine
        .apply(vec![upsert("bad", "workload: w\nservices: {}\n")], "t")
        .expect("2");
    assert_eq!(rejected_docs(&reopen()), ["worse"]);
    // Deleted without ever being in force: gone too.
    engine.delete("worse", None).expect("cleared");
    let reopened = reopen();
    assert!(rejected_docs(&reopened).is_empty());
    assert_eq!(reopened.version(), 2);
}

#[test]
fn a_refused_write_changes_nothing_keeps_file_changes_pending_and_heals() {
    let (engine, dir) = engine("store-fails");
    let file = |text: &str| ScannedFile {
        text: text.into(),
        modified: std::time::SystemTime::UNIX_EPOCH,
    };
    let scan = |text: &str| {
        let mut scan = BTreeMap::new();
        scan.insert("a.yaml".to_string(), file(text));
        scan
    };
    let v1 = "services: { x: { endpoints: [127.0.0.1:1] } }\n";
    let v2 = "services: { x: { endpoints: [127.0.0.1:2] } }\n";
    engine.sync_files(scan(v1), &BTreeSet::new()).expect("v1");
    let healthy = engine.store_status();
    assert!(healthy.healthy && healthy.error.is_none() && healthy.pending.is_none());

    // The state directory becomes a file: every write fails (ENOTDIR).
    std::fs::remove_dir_all(&dir.0).expect("rm");
    std::fs::write(&dir.0, b"").expect("file");
    let failed = engine.sync_files(scan(v2), &BTreeSet::new());
    assert!(
        matches!(&failed, Err(e @ EngineError::Store { .. })
                if e.to_string().starts_with(&format!("cannot write the new version to the state directory {}: cannot create", dir.0.display()))),
        "{failed:?}"
    );
    let applied = engine.apply(vec![upsert("b", "workload: w\n")], "t");
    assert!(
        matches!(applied, Err(EngineError::Store { .. })),
        "{applied:?}"
    );
    assert!(matches!(engine.rollback(1), Err(EngineError::Store { .. })));
    assert_eq!(engine.version(), 1);
    assert!(engine.policy("*").policy.contains("127.0.0.1:1"));
    let failing = engine.status().store.expect("store status");
    assert!(!failing.healthy);
    assert_eq!(failing.write_failures, 3);
    assert!(
        failing
            .error
            .as_deref()
            .is_some_and(|e| e.contains("Not a directory")),
        "{failing:?}"
    );
    assert_eq!(failing.pending.as_deref(), Some("files changed: a.yaml"));
    assert!(engine.file_changes_pending());
    let since = failing.failing_since_ms;

    // Still failing: the first failure's time is kept.
    assert!(engine.sync_files(scan(v2), &BTreeSet::new()).is_err());
    assert_eq!(engine.store_status().failing_since_ms, since);

    // Repaired: the same scan lands as a new version and the failure clears.
    std::fs::remove_file(&dir.0).expect("rm file");
    std::fs::create_dir_all(&dir.0).expect("mkdir");
    let out = engine
        .sync_files(scan(v2), &BTreeSet::new())
        .expect("written")
        .expect("changes");
    assert_eq!(
        (out.version, out.accepted.as_slice()),
        (2, ["a.yaml".to_string()].as_slice())
    );
    assert!(engine.policy("*").policy.contains("127.0.0.1:2"));
    let healed = engine.store_status();
    assert!(healed.healthy && healed.error.is_none() && healed.pending.is_none());
    assert_eq!(healed.write_failures, 4);
    assert!(!engine.file_changes_pending());
}

#[test]
fn an_applied_override_of_a_file_needs_force_and_survives_the_files_next_edit() {
    let (engine, _dir) = engine("drift");
    let scan = |text: &str| {
        BTreeMap::from([(
            "d.yaml".to_string(),
            ScannedFile {
                text: text.into(),
                modified: std::time::SystemTime::UNIX_EPOCH,
            },
        )])
    };
    let file_v1 = "services: { x: { endpoints: [127.0.0.1:1] } }\n";
    let file_v2 = "services: { x: { endpoints: [127.0.0.1:2] } }\n";
    let applied = "services: { x: { endpoints: [127.0.0.1:9] } }\n";
    engine
        .sync_files(scan(file_v1), &BTreeSet::new())
        .expect("v1");
    assert!(matches!(
        engine.apply(vec![upsert("d.yaml", applied)], "t"),
        Err(EngineError::OverridesFile(n)) if n == "d.yaml"
    ));
    let forced = Change::Upsert {
        name: "d.yaml".into(),
        text: applied.into(),
        source: Source::Api,
        force: true,
    };
    assert_eq!(engine.apply(vec![forced], "t").expect("forced").version, 2);
    let doc = |engine: &Engine| {
        engine
            .status()
            .documents
            .into_iter()
            .find(|d| d.name == "d.yaml")
            .expect("d.yaml")
    };
    assert!(doc(&engine).overrides_file && doc(&engine).file_differs);
    // The file's next edit does not undo the applied text; status says it differs.
    assert!(engine
        .sync_files(scan(file_v2), &BTreeSet::new())
        .expect("sync")
        .is_none());
    assert!(engine.policy("*").policy.contains("127.0.0.1:9"));
    assert!(doc(&engine).overrides_file && doc(&engine).file_differs);
    // `delete` hands the document back to the file, at its current text.
    let out = engine.delete("d.yaml", None).expect("delete");
    assert_eq!(out.version, 3);
    assert!(engine.policy("*").policy.contains("127.0.0.1:2"));
    let back = doc(&engine);
    assert_eq!(back.source.as_deref(), Some("file"));
    assert!(!back.overrides_file);
    // And the file rules again.
    engine
        .sync_files(scan(file_v1), &BTreeSet::new())
        .expect("sync")
        .expect("changed");
    assert!(engine.policy("*").policy.contains("127.0.0.1:1"));
}

#[test]
fn deleting_a_never_accepted_document_clears_its_rejection() {
    let (engine, _dir) = engine("clear");
    let out = engine
        .apply(vec![upsert("bad", "services: [\n")], "t")
        .expect("answered");
    assert_eq!(out.rejected.len(), 1);
    assert!(engine.status().documents.iter().any(|d| d.name == "bad"));
    let out = engine.delete("bad", None).expect("cleared");
    assert_eq!(out.unchanged, ["bad"]);
    assert!(engine.status().documents.is_empty());
    assert!(matches!(
        engine.delete("bad", None),
        Err(EngineError::UnknownDocument(_))
    ));
}

#[test]
fn a_workload_no_document_names_is_published_as_unselected() {
    let (engine, _dir) = engine("unselected");
    engine
        .apply(vec![upsert("d", "services: {}\n")], "t")
        .expect("1");
    let shpo = engine.subscribe("shpo");
    assert!(shpo.borrow().unselected);
    engine.connect("p", "shpo", None, None).expect("p");
    let policy = engine.policy("shpo");
    assert!(!policy.named && policy.running);
    let nosuch = engine.policy("nosuch");
    assert!(!nosuch.named && !nosuch.running);
    assert!(engine.policy("*").named);
    // Naming it, even without changing its merged policy, tells its proxies.
    let hash = shpo.borrow().content_hash.clone();
    engine
        .apply(vec![upsert("s", "workload: shpo\n")], "t")
        .expect("2");
    assert!(!shpo.borrow().unselected);
    assert_eq!(shpo.borrow().content_hash, hash);
}

#[test]
fn ack_and_nack_show_in_status() {
    let (engine, _dir) = engine("ack");
    engine
        .apply(vec![upsert("d", "services: {}\n")], "t")
        .expect("applied");
    let current = engine.policy("w");
    let session = engine.connect("p1", "w", None, None).expect("session");
    let conn = session.connection;
    engine.sent("p1", conn, current.version, &current.content_hash);
    let ack = |error: Option<&str>, hash: &str| Ack {
        proxy: "p1".into(),
        workload: "w".into(),
        version: current.version,
        content_hash: hash.into(),
        error: error.map(String::from),
        session: session.id.clone(),
    };
    assert_eq!(engine.status().proxies[0].state, "pending");
    engine.ack(ack(Some("port taken"), "x")).expect("nack");
    assert_eq!(engine.status().proxies[0].state, "nack");
    engine.ack(ack(None, &current.content_hash)).expect("ack");
    let status = engine.status();
    assert_eq!(status.proxies[0].state, "in-sync");
    assert_eq!(status.proxies[0].version_applied, Some(current.version));
    engine.disconnected("p1", conn);
    assert_eq!(engine.status().proxies[0].state, "disconnected");
}
