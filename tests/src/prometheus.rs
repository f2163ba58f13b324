//! Prometheus fixtures: `promtool check metrics` on an exposition, exact samples read from
//! one, and a real Prometheus server (Debian's `prometheus`, installed by `.ci/run`) scraping
//! targets on 127.0.0.1 every second, queried over its HTTP API.
//!
//! Without the binaries the checks skip with a message, unless OUTRIDER_REQUIRE_PROMTOOL is
//! set (`.ci/run` sets it): then a missing binary fails the test.

use std::io::Write;
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use http::Request;
use http_body_util::BodyExt;

use crate::{empty, http1_client, TempDir};

/// Whether a missing Prometheus binary fails the test (in CI) rather than skipping it.
fn required() -> bool {
    std::env::var_os("OUTRIDER_REQUIRE_PROMTOOL").is_some()
}

/// Runs `promtool check metrics` on an exposition and fails the test on any finding.
pub fn promtool_check(text: &str) {
    let child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn();
    let mut child = match child {
        Ok(child) => child,
        Err(e) => {
            assert!(!required(), "promtool required but not runnable: {e}");
            eprintln!("promtool not installed; exposition not validated");
            return;
        }
    };
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool check metrics failed:\n{}{}\n--- exposition:\n{text}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The value of the sample named exactly `series` (`name{labels}`, labels in the exposition's
/// order: alphabetical), if the exposition has it.
pub fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(series).and_then(|v| v.strip_prefix(' ')))
        .map(|v| v.trim().parse().unwrap())
}

/// A running Prometheus server with its own data directory (removed on drop, after the
/// process is killed).
pub struct Prometheus {
    child: Child,
    /// Its HTTP API.
    pub addr: SocketAddr,
    targets: std::path::PathBuf,
    _dir: TempDir,
}

/// Scrape interval of the fixture: short, so a test waits seconds for data.
pub const SCRAPE_INTERVAL: Duration = Duration::from_secs(1);

impl Prometheus {
    /// Starts Prometheus scraping `static_targets` (job, address) every second, plus the
    /// targets [`Self::add_targets`] writes later (file service discovery, re-read on change);
    /// waits until it is ready. `None` when the binary is missing and not required.
    pub async fn start(static_targets: &[(&str, SocketAddr)]) -> Option<Self> {
        let dir = TempDir::new();
        let targets = dir.path.join("targets");
        std::fs::create_dir_all(&targets).unwrap();
        let mut config = format!(
            "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n  evaluation_interval: 1s\nscrape_configs:\n  - job_name: discovered\n    file_sd_configs:\n      - files: ['{}/*.json']\n        refresh_interval: 1s\n",
            targets.display()
        );
        for (job, addr) in static_targets {
            config.push_str(&format!(
                "  - job_name: {job}\n    static_configs:\n      - targets: ['{addr}']\n"
            ));
        }
        let config_path = dir.path.join("prometheus.yml");
        std::fs::write(&config_path, config).unwrap();
        // A free port: bound, then released for Prometheus (which cannot report one it chose).
        let addr = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        let child = Command::new("prometheus")
            .arg(format!("--config.file={}", config_path.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path.join("data").display()
            ))
            .arg(format!("--web.listen-address={addr}"))
            .args(["--log.level=warn", "--storage.tsdb.retention.time=1h"])
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn();
        let child = match child {
            Ok(child) => child,
            Err(e) => {
                assert!(!required(), "prometheus required but not runnable: {e}");
                eprintln!("prometheus not installed; skipped");
                return None;
            }
        };
        let mut prometheus = Self {
            child,
            addr,
            targets,
            _dir: dir,
        };
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            if prometheus.get("/-/ready").await.0 == 200 {
                return Some(prometheus);
            }
            if let Some(status) = prometheus.child.try_wait().unwrap() {
                let mut stderr = String::new();
                if let Some(mut pipe) = prometheus.child.stderr.take() {
                    let _ = std::io::Read::read_to_string(&mut pipe, &mut stderr);
                }
                panic!("prometheus exited ({status}):\n{stderr}");
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "prometheus not ready within 30 s"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Adds scrape targets under `job` (written atomically, picked up within a second).
    pub fn add_targets(&self, job: &str, addrs: &[SocketAddr]) {
        let list: Vec<String> = addrs.iter().map(ToString::to_string).collect();
        let json = serde_json::json!([{ "targets": list, "labels": { "job": job } }]);
        let tmp = self.targets.join(format!(".{job}.tmp"));
        std::fs::write(&tmp, json.to_string()).unwrap();
        std::fs::rename(&tmp, self.targets.join(format!("{job}.json"))).unwrap();
    }

    /// GET on the HTTP API: status and body; (0, error) when it cannot be reached or does
    /// not answer within 10 s.
    async fn get(&self, path_and_query: &str) -> (u16, String) {
        let req = Request::get(format!("http://{}{path_and_query}", self.addr))
            .body(empty())
            .unwrap();
        let exchange = async {
            let res = http1_client().request(req).await?;
            let status = res.status().as_u16();
            let body = res.into_body().collect().await?.to_bytes();
            Ok::<_, crate::BoxError>((status, String::from_utf8_lossy(&body).into_owned()))
        };
        match tokio::time::timeout(Duration::from_secs(10), exchange).await {
            Ok(Ok(answer)) => answer,
            Ok(Err(e)) => (0, e.to_string()),
            Err(_) => (0, "timed out".into()),
        }
    }

    /// Evaluates an instant PromQL query now (`/api/v1/query`) and returns its result
    /// vector; panics on an error answer (a query that does not parse, for one).
    pub async fn query(&self, promql: &str) -> Vec<serde_json::Value> {
        let (status, body) = self
            .get(&format!("/api/v1/query?query={}", encode_component(promql)))
            .await;
        assert_eq!(status, 200, "query {promql} failed: {body}");
        let answer: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(answer["status"], "success", "query {promql}: {answer}");
        match &answer["data"]["result"] {
            serde_json::Value::Array(samples) => samples.clone(),
            // A scalar or string result: one value.
            other => vec![serde_json::json!({ "metric": {}, "value": other })],
        }
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The value of one sample of a query result (`NaN` and infinities included).
pub fn value(sample: &serde_json::Value) -> f64 {
    sample["value"][1]
        .as_str()
        .and_then(|v| v.parse().ok())
        .unwrap_or(f64::NAN)
}

/// Percent-encodes everything but RFC 3986's unreserved characters.
fn encode_component(s: &str) -> String {
    let mut out = String::with_capacity(s.len() * 3);
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}
