//! The JSON bodies of the control plane's management API, shared by the server and
//! `outriderctl`. (The proxies' protocol is [`outrider_config::wire`].)
//!
//! | request | token | answer |
//! |---|---|---|
//! | `POST /v1/apply?name=N` (YAML body) | yes | 200 [`Applied`], 422 [`Rejected`] |
//! | `POST /v1/apply?name=N&dry_run=1` | yes | the same answers; nothing changes, nothing is pushed |
//! | `POST /v1/apply?name=N&timeout_ms=T` | yes | also 503 when T ms passed before the change could be committed: nothing changed |
//! | `POST /v1/apply?name=N` where N comes from the policy directory | yes | 409 unless `force=1`: the applied text then overrides the file until `delete` |
//! | `GET /v1/history` | yes | 200 `[`[`HistoryEntry`]`]` newest first |
//! | `POST /v1/rollback?to=N` | yes | 200 [`Applied`], 404 when N is not kept |
//! | `POST /v1/delete?name=N&timeout_ms=T` | yes | 200 [`Applied`], 404 when N is not in force, 409 when N comes from the policy directory, 422 [`Rejected`] when what remains would not validate, 503 as for apply |
//! | `GET /v1/policy?workload=W` | yes | 200 [`WorkloadPolicy`] (any W: one no document names gets the defaults) |
//! | `GET /v1/status` | from loopback: no | 200 [`Status`] |
//! | `GET /v1/version` | from loopback: no | 200 [`ServerVersion`] |
//! | `GET /live`, `GET /ready` | no | 200 (`/ready`'s body names a failing state directory) |
//! | `GET /metrics` | no | 200, Prometheus text |
//!
//! Every other failure is an [`ErrorBody`] with a 4xx/5xx status. A change the state directory
//! could not take (`apply`, `rollback`, `delete`) is answered 507: nothing changed.

use serde::{Deserialize, Serialize};

/// Path of `apply`.
pub const APPLY_PATH: &str = "/v1/apply";
/// Path of `history`.
pub const HISTORY_PATH: &str = "/v1/history";
/// Path of `rollback`.
pub const ROLLBACK_PATH: &str = "/v1/rollback";
/// Path of `delete`.
pub const DELETE_PATH: &str = "/v1/delete";
/// Path of `policy`.
pub const POLICY_PATH: &str = "/v1/policy";
/// Path of `status`.
pub const STATUS_PATH: &str = "/v1/status";
/// Path of `version`.
pub const VERSION_PATH: &str = "/v1/version";
/// GET: the policy's JSON Schema (`application/schema+json`), open without a token so that an
/// editor can fetch it: the same document as `deploy/schema/policy.json`.
pub const SCHEMA_PATH: &str = "/v1/schema/policy.json";
/// Query parameter of `apply`: `1` lets an applied document override one read from the
/// policy directory.
pub const FORCE_PARAM: &str = "force";
/// Query parameter of `apply`: milliseconds the client waits for the answer. A change not
/// committed by then is not made at all (503), so a client that gave up never finds it
/// applied later.
pub const TIMEOUT_PARAM: &str = "timeout_ms";

/// An accepted change.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Applied {
    /// The version in force after the change.
    pub version: u64,
    /// True when the document was identical to the one in force: no new version.
    pub unchanged: bool,
    /// Unified diff of the document against the one in force (empty when unchanged or for a
    /// rollback).
    pub diff: String,
    /// Workloads whose merged policy changed, with their new hashes.
    pub workloads: Vec<WorkloadVersion>,
    /// What was accepted but will do nothing yet, in words (absent when nothing).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub warnings: Vec<String>,
}

/// A workload's merged policy identity.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkloadVersion {
    /// The workload (`*`: workloads no document names).
    pub workload: String,
    /// Version it was merged at.
    pub version: u64,
    /// Hash of the merged YAML.
    pub content_hash: String,
}

/// A rejected document.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rejected {
    /// The document (file name or applied name).
    pub document: String,
    /// Every problem on one line each (`path: message at file:line:column`).
    pub message: String,
    /// For terminals: each problem with the source line and a caret under the spot.
    pub rendered: String,
    /// The problems, structured.
    pub diagnostics: Vec<ApiDiagnostic>,
    /// When, in milliseconds since the Unix epoch.
    pub at_ms: u64,
    /// Whether the rejected text came from the policy directory (rather than `apply`).
    #[serde(default)]
    pub from_file: bool,
}

/// One problem of a rejected document.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApiDiagnostic {
    /// Path of the offending value; empty for syntax errors and conflicts.
    pub path: String,
    /// What is wrong.
    pub message: String,
    /// 1-based line, when known.
    pub line: Option<usize>,
    /// 1-based column, when known.
    pub column: Option<usize>,
}

/// One kept version.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HistoryEntry {
    /// The version.
    pub version: u64,
    /// When, in milliseconds since the Unix epoch.
    pub at_ms: u64,
    /// What made it.
    pub cause: String,
    /// The documents in force at that version.
    pub documents: Vec<String>,
}

/// A workload's merged policy.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkloadPolicy {
    /// The workload.
    pub workload: String,
    /// Version it was merged at.
    pub version: u64,
    /// Hash of `policy`.
    pub content_hash: String,
    /// The merged policy as YAML.
    pub policy: String,
    /// Whether a document names the workload (always true for `*`).
    #[serde(default = "yes")]
    pub named: bool,
    /// Whether a connected proxy runs it.
    #[serde(default = "yes")]
    pub running: bool,
}

/// The control plane's state at a glance.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Status {
    /// The version in force.
    pub version: u64,
    /// Documents in force or rejected.
    pub documents: Vec<DocumentStatus>,
    /// Every proxy seen since the control plane started.
    pub proxies: Vec<ProxyStatus>,
    /// How writes of the state directory fare; `None` from a control plane that predates it.
    #[serde(default)]
    pub store: Option<StoreStatus>,
    /// The mesh CA's certificate and the latest leaf issued per identity; `None` without a CA
    /// (or from a control plane that predates it).
    #[serde(default)]
    pub certificates: Option<CertificatesStatus>,
    /// The control plane's clock when it answered, in ms since the Unix epoch (0 from a
    /// control plane that predates it).
    #[serde(default)]
    pub now_ms: u64,
    /// The replica that answered; `None` from a control plane that predates it.
    #[serde(default)]
    pub replica: Option<ReplicaStatus>,
}

/// The replica that answered a status request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReplicaStatus {
    /// Its name (`--replica-name`).
    pub name: String,
    /// Whether it leads: only the leader imports the policy directory. A single replica (on
    /// a state directory) always does.
    pub leader: bool,
    /// Whether it is one of several on a shared store (etcd).
    #[serde(default)]
    pub replicated: bool,
    /// Since how long its view may be behind etcd (its watch is down), in ms; `None` while
    /// the view is current.
    #[serde(default)]
    pub view_behind_ms: Option<u64>,
    /// Whether the view has been behind for longer than `--view-stale-after`.
    #[serde(default)]
    pub view_stale: bool,
    /// Why other replicas' proxies are missing from the list, when they could not be read.
    #[serde(default)]
    pub other_replicas_error: Option<String>,
}

/// The control plane's build and clock (`GET /v1/version`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServerVersion {
    /// `outrider-control`'s version (its Cargo package version).
    pub version: String,
    /// Its clock when it answered, in ms since the Unix epoch.
    pub now_ms: u64,
}

/// The certificates the mesh CA stands behind.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CertificatesStatus {
    /// When the CA's signing certificate expires, in ms since the Unix epoch.
    pub ca_not_after_ms: u64,
    /// Lifetime of issued leaves, in ms.
    pub leaf_ttl_ms: u64,
    /// The latest leaf issued per identity, until it expires.
    pub issued: Vec<IssuedCertificate>,
}

/// The latest certificate issued for one identity.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IssuedCertificate {
    /// Its SPIFFE id.
    pub identity: String,
    /// When it was issued, in ms since the Unix epoch.
    pub issued_at_ms: u64,
    /// When it expires, in ms since the Unix epoch.
    pub not_after_ms: u64,
}
/// The state directory's health. A change is in force only once written there, so while
/// writes fail no change is made: `apply` is refused and policy-file changes wait (`pending`),
/// retried until a write succeeds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoreStatus {
    /// The state directory.
    pub dir: String,
    /// False while writes fail (from the first failed write to the next successful one).
    pub healthy: bool,
    /// The last failed write's error (file and OS error), while failing.
    pub error: Option<String>,
    /// When writes began to fail, in ms since the Unix epoch.
    pub failing_since_ms: Option<u64>,
    /// Failed writes since the control plane started.
    pub write_failures: u64,
    /// Policy-file changes not yet written (`files changed: a.yaml`), retried until they are.
    pub pending: Option<String>,
}

/// One document's state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DocumentStatus {
    /// Its name.
    pub name: String,
    /// `file` or `api`; `None` when no version of it was ever accepted.
    pub source: Option<String>,
    /// Version at which the text in force was accepted.
    pub changed_at: Option<u64>,
    /// The last rejection of a newer text, if the text in force is not the newest submitted.
    pub rejected: Option<Rejected>,
    /// The workloads it names (`*` for a defaults document); empty when none is in force.
    #[serde(default)]
    pub workloads: Vec<String>,
    /// An applied document that overrides the policy directory's file of the same name: the
    /// file's changes are not in force until `outriderctl delete NAME` hands it back.
    #[serde(default)]
    pub overrides_file: bool,
    /// With `overrides_file`: whether the file now differs from the applied text.
    #[serde(default)]
    pub file_differs: bool,
}

/// One proxy's state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProxyStatus {
    /// Its id.
    pub proxy: String,
    /// Its workload.
    pub workload: String,
    /// Whether its stream is open.
    pub connected: bool,
    /// When its current (or last) stream opened, in ms since the Unix epoch.
    pub connected_since_ms: u64,
    /// The last version sent to it.
    pub version_sent: Option<u64>,
    /// The last version it ACKed.
    pub version_applied: Option<u64>,
    /// When it ACKed that, in ms since the Unix epoch.
    pub applied_at_ms: Option<u64>,
    /// Its last NACK.
    pub last_nack: Option<Nack>,
    /// `in-sync`, `pending`, `nack` or `disconnected`.
    pub state: String,
    /// When the version it has not ACKed yet was sent, in ms since the Unix epoch (`None`
    /// when in sync).
    #[serde(default)]
    pub pending_since_ms: Option<u64>,
    /// Whether some document names its workload; `false`: it runs only the defaults (a
    /// misspelt `--workload`?).
    #[serde(default = "yes")]
    pub workload_named: bool,
    /// When its stream closed, in ms since the Unix epoch (`None` while connected).
    #[serde(default)]
    pub disconnected_at_ms: Option<u64>,
    /// The replica it is (or was last) connected to; `None` from a control plane that
    /// predates replicas.
    #[serde(default)]
    pub replica: Option<String>,
}

fn yes() -> bool {
    true
}

/// A proxy's refusal of a version.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Nack {
    /// The version refused.
    pub version: u64,
    /// The proxy's reason.
    pub error: String,
    /// When, in ms since the Unix epoch.
    pub at_ms: u64,
}

/// Any other failure.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorBody {
    /// What went wrong.
    pub error: String,
    /// A machine-readable kind, where a client acts on it: [`STORE_UNAVAILABLE`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kind: Option<String>,
}

/// [`ErrorBody::kind`] of a change refused because the store (etcd) is unavailable: the
/// replica is read-only until it is back (`outriderctl` exits 75).
pub const STORE_UNAVAILABLE: &str = "store-unavailable";

/// Milliseconds since the Unix epoch, now.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// `ms` since the Unix epoch as `YYYY-MM-DDTHH:MM:SSZ` (UTC, whole seconds).
pub fn format_utc(ms: u64) -> String {
    use time::format_description::well_known::Rfc3339;
    // Whole seconds: RFC 3339 then has no fraction. Past year 9999 (out of `time`'s range)
    // the epoch stands in; our own clock is the only source.
    let at = i64::try_from(ms / 1000)
        .ok()
        .and_then(|secs| time::OffsetDateTime::from_unix_timestamp(secs).ok())
        .unwrap_or(time::OffsetDateTime::UNIX_EPOCH);
    at.format(&Rfc3339).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_utc() {
        assert_eq!(format_utc(0), "1970-01-01T00:00:00Z");
        assert_eq!(format_utc(951_782_400_000), "2000-02-29T00:00:00Z");
        assert_eq!(format_utc(1_795_000_000_999), "2026-11-18T11:06:40Z");
    }
}
