//! A real etcd cluster (Debian's `etcd-server`, etcd 3.4) on loopback ports for the
//! control-plane replica tests: members on free ports of their own, data in a temporary
//! directory, each killed (SIGKILL) and restarted on demand, all killed and removed on drop.
//! `scripts/ensure-etcd` installs etcd; without it the tests skip, unless
//! OUTRIDER_REQUIRE_ETCD=1 (CI) makes that a failure.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::TempDir;

/// Longest a member takes to join its cluster and report healthy.
const START_BOUND: Duration = Duration::from_secs(30);

/// Whether a missing etcd fails the tests instead of skipping them (CI sets it).
pub fn required() -> bool {
    std::env::var_os("OUTRIDER_REQUIRE_ETCD").is_some_and(|v| v == "1")
}

/// The etcd binary on PATH, if installed.
pub fn binary() -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join("etcd"))
        .find(|candidate| candidate.is_file())
}

struct Member {
    name: String,
    client_port: u16,
    peer_port: u16,
    child: Option<Child>,
}

/// A running etcd cluster.
pub struct EtcdCluster {
    members: Vec<Member>,
    initial_cluster: String,
    binary: PathBuf,
    dir: TempDir,
}

/// `n` distinct free ports on 127.0.0.1 (held together while chosen, so they differ).
fn free_ports(n: usize) -> Vec<u16> {
    let listeners: Vec<TcpListener> = (0..n)
        .map(|_| TcpListener::bind("127.0.0.1:0").expect("bind a free port"))
        .collect();
    listeners
        .iter()
        .map(|l| l.local_addr().expect("local addr").port())
        .collect()
}

impl EtcdCluster {
    /// Starts `size` members and waits (bounded) until every one is healthy. `None`, with a
    /// message, when etcd is not installed and not required.
    pub fn start(size: usize) -> Option<Self> {
        let Some(binary) = binary() else {
            assert!(
                !required(),
                "OUTRIDER_REQUIRE_ETCD=1 but etcd is not installed (scripts/ensure-etcd)"
            );
            eprintln!("skipped: etcd is not installed (scripts/ensure-etcd installs it)");
            return None;
        };
        let ports = free_ports(size * 2);
        let members: Vec<Member> = (0..size)
            .map(|i| Member {
                name: format!("m{i}"),
                client_port: ports[i * 2],
                peer_port: ports[i * 2 + 1],
                child: None,
            })
            .collect();
        let initial_cluster = members
            .iter()
            .map(|m| format!("{}=http://127.0.0.1:{}", m.name, m.peer_port))
            .collect::<Vec<_>>()
            .join(",");
        let mut cluster = Self {
            members,
            initial_cluster,
            binary,
            dir: TempDir::new(),
        };
        for i in 0..size {
            cluster.spawn(i);
        }
        cluster.wait_healthy(&(0..size).collect::<Vec<_>>());
        Some(cluster)
    }

    fn spawn(&mut self, i: usize) {
        let member = &self.members[i];
        let client = format!("http://127.0.0.1:{}", member.client_port);
        let peer = format!("http://127.0.0.1:{}", member.peer_port);
        let log = std::fs::File::create(self.dir.path.join(format!("{}.log", member.name)))
            .expect("etcd log file");
        // etcd's default heartbeat (100 ms) and election timeout (1 s): the elections a real
        // cluster has, and a margin against a member starved of CPU on a loaded machine
        // missing heartbeats and calling elections of its own.
        let child = Command::new(&self.binary)
            .args(["--name", &member.name])
            .arg("--data-dir")
            .arg(self.dir.path.join(&member.name))
            .args(["--listen-client-urls", &client])
            .args(["--advertise-client-urls", &client])
            .args(["--listen-peer-urls", &peer])
            .args(["--initial-advertise-peer-urls", &peer])
            .args(["--initial-cluster", &self.initial_cluster])
            .args(["--initial-cluster-state", "new"])
            .args(["--initial-cluster-token", "outrider-test"])
            .args(["--heartbeat-interval", "100", "--election-timeout", "1000"])
            .args(["--logger", "zap", "--log-level", "warn"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn etcd");
        self.members[i].child = Some(child);
    }

    /// `etcd://` and every member's client address, for `--store`.
    pub fn url(&self) -> String {
        let members: Vec<String> = self
            .members
            .iter()
            .map(|m| format!("127.0.0.1:{}", m.client_port))
            .collect();
        format!("etcd://{}", members.join(","))
    }

    /// SIGKILLs member `i`.
    pub fn kill(&mut self, i: usize) {
        if let Some(mut child) = self.members[i].child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Restarts member `i` on its data (after [`Self::kill`]), without waiting.
    pub fn restart(&mut self, i: usize) {
        self.kill(i);
        self.spawn(i);
    }

    /// Polls `/health` of each of `members` until it reports a leader, at most
    /// `START_BOUND`; panics with the members' logs past it.
    pub fn wait_healthy(&self, members: &[usize]) {
        let deadline = Instant::now() + START_BOUND;
        for &i in members {
            while !self.healthy(i) {
                assert!(
                    Instant::now() < deadline,
                    "etcd member {i} not healthy within {START_BOUND:?}; logs:\n{}",
                    self.logs()
                );
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }

    /// Whether member `i` answers `/health` with `"health":"true"` (it has a leader).
    pub fn healthy(&self, i: usize) -> bool {
        let addr = format!("127.0.0.1:{}", self.members[i].client_port);
        let Ok(mut stream) =
            TcpStream::connect_timeout(&addr.parse().expect("address"), Duration::from_millis(500))
        else {
            return false;
        };
        let _ = stream.set_read_timeout(Some(Duration::from_secs(2)));
        let _ = stream.set_write_timeout(Some(Duration::from_secs(2)));
        let request = format!("GET /health HTTP/1.0\r\nHost: {addr}\r\n\r\n");
        if stream.write_all(request.as_bytes()).is_err() {
            return false;
        }
        let mut answer = String::new();
        let _ = stream.take(64 * 1024).read_to_string(&mut answer);
        answer.contains("\"health\":\"true\"")
    }

    /// The member that leads the cluster now, as the members still running say (etcd's
    /// `/v3/maintenance/status` gateway, what `etcdctl endpoint status` reads); `None` while
    /// none answers with a leader.
    pub fn leader(&self) -> Option<usize> {
        (0..self.members.len()).find(|&i| {
            self.members[i].child.is_some()
                && self.status(i).is_some_and(|status| {
                    let leader = status["leader"].as_str();
                    leader.is_some() && leader == status["header"]["member_id"].as_str()
                })
        })
    }

    /// Member `i`'s `/v3/maintenance/status` answer.
    fn status(&self, i: usize) -> Option<serde_json::Value> {
        let addr = format!("127.0.0.1:{}", self.members[i].client_port);
        let mut stream =
            TcpStream::connect_timeout(&addr.parse().ok()?, Duration::from_millis(500)).ok()?;
        stream.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
        stream
            .set_write_timeout(Some(Duration::from_secs(2)))
            .ok()?;
        let request = format!(
            "POST /v3/maintenance/status HTTP/1.0\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{{}}"
        );
        stream.write_all(request.as_bytes()).ok()?;
        let mut answer = String::new();
        let _ = stream.take(64 * 1024).read_to_string(&mut answer);
        let (_, body) = answer.split_once("\r\n\r\n")?;
        serde_json::from_str(body).ok()
    }

    /// Every member's log, for a failure message.
    pub fn logs(&self) -> String {
        self.members
            .iter()
            .map(|m| {
                let log = std::fs::read_to_string(self.dir.path.join(format!("{}.log", m.name)))
                    .unwrap_or_default();
                format!("== {}\n{log}", m.name)
            })
            .collect::<Vec<_>>()
            .join("\n")
    }
}

impl Drop for EtcdCluster {
    fn drop(&mut self) {
        for i in 0..self.members.len() {
            self.kill(i);
        }
    }
}
