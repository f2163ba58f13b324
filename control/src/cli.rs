//! The `outriderctl` commands that talk to the control plane: `apply`, `status`, `history`,
//! `rollback`, `delete`, `get`. Exit codes: 0 success, 1 rejected (invalid or conflicting
//! policy, unknown version, a document not in force or from the policy directory), 66
//! unreadable file, 69 control plane unreachable, change not made (its deadline passed) or
//! outcome unknown, 70 unexpected answer, 74 change not made because the control plane cannot
//! write its state directory, 77 token refused.

use std::fmt::Write as _;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde::de::DeserializeOwned;

use crate::api::{
    self, format_utc, Applied, ErrorBody, HistoryEntry, Rejected, Status, WorkloadPolicy,
};

const EX_REJECTED: u8 = 1;
const EX_NOINPUT: u8 = 66;
const EX_UNAVAILABLE: u8 = 69;
const EX_SOFTWARE: u8 = 70;
const EX_IOERR: u8 = 74;
const EX_NOPERM: u8 = 77;

/// Bound on one request to the control plane.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// The deadline `apply` gives the server: shorter than [`REQUEST_TIMEOUT`] by the time a
/// commit and its answer may take, so the server gives up on a change before we do.
const APPLY_DEADLINE: Duration = Duration::from_secs(8);

/// Where the control plane is and how to authenticate.
#[derive(Debug, Clone, clap::Args)]
pub struct Remote {
    /// The control plane's URL.
    #[arg(
        long,
        env = "OUTRIDER_CONTROL_URL",
        default_value = "http://127.0.0.1:15010"
    )]
    pub server: String,
    /// File holding the token; or set OUTRIDER_CONTROL_TOKEN.
    #[arg(long, env = "OUTRIDER_CONTROL_TOKEN_FILE")]
    pub token_file: Option<PathBuf>,
}

/// `outriderctl apply` flags.
#[derive(Debug, Clone, clap::Args)]
pub struct ApplyArgs {
    /// Policy documents to apply; each is named by its file name unless --name is given.
    #[arg(short = 'f', long = "file", required = true)]
    pub files: Vec<PathBuf>,
    /// The document's name (one file only); applying a name again replaces that document.
    #[arg(long)]
    pub name: Option<String>,
    /// Validate on the server and show the diff and the workloads it would change, without
    /// applying or pushing anything.
    #[arg(long)]
    pub dry_run: bool,
    #[command(flatten)]
    #[allow(missing_docs)]
    pub remote: Remote,
}

/// `outriderctl rollback` flags.
#[derive(Debug, Clone, clap::Args)]
pub struct RollbackArgs {
    /// The kept version to return to (see `outriderctl history`).
    #[arg(long)]
    pub to: u64,
    #[command(flatten)]
    #[allow(missing_docs)]
    pub remote: Remote,
}

/// `outriderctl delete` flags.
#[derive(Debug, Clone, clap::Args)]
pub struct DeleteArgs {
    /// The document to remove, as named when applied (see `outriderctl status`).
    pub name: String,
    #[command(flatten)]
    #[allow(missing_docs)]
    pub remote: Remote,
}

/// `outriderctl get` flags.
#[derive(Debug, Clone, clap::Args)]
pub struct GetArgs {
    /// The workload whose merged policy to print (`*`: workloads no document names).
    pub workload: String,
    #[command(flatten)]
    #[allow(missing_docs)]
    pub remote: Remote,
}

/// Why a command failed.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    /// Nothing answers at the URL.
    #[error("cannot reach the control plane at {url}: {reason} (is outrider-control running? set --server or OUTRIDER_CONTROL_URL)")]
    Unreachable {
        /// The URL tried.
        url: String,
        /// The innermost cause (`Connection refused`...).
        reason: String,
    },
    /// 401.
    #[error("the control plane at {url} refused {}: check --token-file, OUTRIDER_CONTROL_TOKEN_FILE or OUTRIDER_CONTROL_TOKEN", if *.had_token { "the token (401)" } else { "the request: no token given (401)" })]
    Unauthorized {
        /// The URL.
        url: String,
        /// Whether a token was sent.
        had_token: bool,
    },
    /// No answer in time.
    #[error("the control plane at {0} did not answer within {REQUEST_TIMEOUT:?}")]
    Timeout(String),
    /// `apply` got no answer in time: the change was most likely not made (the server drops
    /// it past its deadline), but only the history can tell.
    #[error("the control plane at {url} did not answer within {REQUEST_TIMEOUT:?}: whether {name} was applied is unknown (it is not applied past {APPLY_DEADLINE:?} unless the commit had begun); `outriderctl history` shows a version with cause `apply {name}` if it was")]
    ApplyOutcomeUnknown {
        /// The URL.
        url: String,
        /// The document.
        name: String,
    },
    /// `delete` got no answer in time, like [`Self::ApplyOutcomeUnknown`].
    #[error("the control plane at {url} did not answer within {REQUEST_TIMEOUT:?}: whether {name} was deleted is unknown (it is not deleted past {APPLY_DEADLINE:?} unless the commit had begun); `outriderctl history` shows a version with cause `delete {name}` if it was")]
    DeleteOutcomeUnknown {
        /// The URL.
        url: String,
        /// The document.
        name: String,
    },
    /// The control plane could not make the change (its deadline passed, its disk failed):
    /// nothing changed.
    #[error("{name} not {verb}: {message}")]
    NotApplied {
        /// The document.
        name: String,
        /// `applied` or `deleted`.
        verb: &'static str,
        /// The control plane's reason.
        message: String,
    },
    /// The control plane cannot write its state directory (507): nothing changed.
    #[error("{name} not {verb}: {message}")]
    StoreFailed {
        /// The document, or `version N` for a rollback.
        name: String,
        /// `applied`, `deleted` or `rolled back to`.
        verb: &'static str,
        /// The control plane's reason: the state directory, the file and the OS error.
        message: String,
    },
    /// `--server` is not an http:// URL.
    #[error("--server must be an http:// URL, got {0:?}")]
    BadUrl(String),
    /// The token file cannot be read.
    #[error("cannot read the token file {path}: {source}")]
    TokenFile {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// An answer this CLI does not understand.
    #[error("unexpected answer from the control plane ({status}): {message}")]
    Unexpected {
        /// Its status.
        status: StatusCode,
        /// Its error message or body.
        message: String,
    },
}

impl CliError {
    fn exit_code(&self) -> ExitCode {
        ExitCode::from(match self {
            Self::Unreachable { .. }
            | Self::Timeout(_)
            | Self::ApplyOutcomeUnknown { .. }
            | Self::DeleteOutcomeUnknown { .. }
            | Self::NotApplied { .. } => EX_UNAVAILABLE,
            Self::Unauthorized { .. } => EX_NOPERM,
            Self::StoreFailed { .. } => EX_IOERR,
            Self::TokenFile { .. } => EX_NOINPUT,
            Self::BadUrl(_) => 64,
            Self::Unexpected { .. } => EX_SOFTWARE,
        })
    }
}

/// A connection to the control plane's API.
struct Api {
    base: String,
    token: Option<String>,
    client: Client<HttpConnector, Full<Bytes>>,
}

impl Api {
    fn new(remote: &Remote) -> Result<Self, CliError> {
        let base = remote.server.trim_end_matches('/').to_string();
        if !base.starts_with("http://") {
            return Err(CliError::BadUrl(remote.server.clone()));
        }
        let token = match &remote.token_file {
            Some(path) => Some(
                std::fs::read_to_string(path)
                    .map_err(|source| CliError::TokenFile {
                        path: path.clone(),
                        source,
                    })?
                    .trim()
                    .to_string(),
            ),
            None => std::env::var("OUTRIDER_CONTROL_TOKEN")
                .ok()
                .map(|t| t.trim().to_string()),
        }
        .filter(|t| !t.is_empty());
        Ok(Self {
            base,
            token,
            client: Client::builder(TokioExecutor::new()).build_http(),
        })
    }

    /// Sends a request; 401 and transport failures become errors, any other status is
    /// returned with the body.
    async fn call(
        &self,
        method: Method,
        path: &str,
        body: Bytes,
    ) -> Result<(StatusCode, Bytes), CliError> {
        let mut req = Request::builder()
            .method(method)
            .uri(format!("{}{path}", self.base));
        if let Some(token) = &self.token {
            req = req.header(http::header::AUTHORIZATION, format!("Bearer {token}"));
        }
        let req = req
            .body(Full::new(body))
            .map_err(|_| CliError::BadUrl(self.base.clone()))?;
        let exchange = async {
            let res = self.client.request(req).await?;
            let status = res.status();
            let body = res.into_body().collect().await?.to_bytes();
            Ok::<_, Box<dyn std::error::Error + Send + Sync>>((status, body))
        };
        let (status, body) = match tokio::time::timeout(REQUEST_TIMEOUT, exchange).await {
            Err(_) => return Err(CliError::Timeout(self.base.clone())),
            Ok(Err(e)) => {
                return Err(CliError::Unreachable {
                    url: self.base.clone(),
                    reason: root_cause(e.as_ref()),
                })
            }
            Ok(Ok(answer)) => answer,
        };
        if status == StatusCode::UNAUTHORIZED {
            return Err(CliError::Unauthorized {
                url: self.base.clone(),
                had_token: self.token.is_some(),
            });
        }
        Ok((status, body))
    }

    /// A request whose only success is 200 with a `T`.
    async fn get_json<T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
    ) -> Result<T, CliError> {
        let (status, body) = self.call(method, path, Bytes::new()).await?;
        if status != StatusCode::OK {
            return Err(unexpected(status, &body));
        }
        decode(status, &body)
    }
}

fn decode<T: DeserializeOwned>(status: StatusCode, body: &[u8]) -> Result<T, CliError> {
    serde_json::from_slice(body).map_err(|e| CliError::Unexpected {
        status,
        message: format!("{e}: {}", String::from_utf8_lossy(body)),
    })
}

fn unexpected(status: StatusCode, body: &[u8]) -> CliError {
    CliError::Unexpected {
        status,
        message: error_message(body),
    }
}

/// The `error` of an [`ErrorBody`], or the body as text.
fn error_message(body: &[u8]) -> String {
    serde_json::from_slice::<ErrorBody>(body)
        .map(|e| e.error)
        .unwrap_or_else(|_| String::from_utf8_lossy(body).into_owned())
}

fn root_cause(e: &(dyn std::error::Error + 'static)) -> String {
    let mut cause = e;
    while let Some(next) = cause.source() {
        cause = next;
    }
    cause.to_string()
}

/// Runs `body` on a small runtime, printing a failure and mapping it to its exit code.
fn run<F>(body: impl FnOnce(Api) -> F, remote: &Remote) -> ExitCode
where
    F: std::future::Future<Output = Result<ExitCode, CliError>>,
{
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("outriderctl: cannot start runtime: {e}");
            return ExitCode::from(EX_SOFTWARE);
        }
    };
    let result = Api::new(remote).map(|api| runtime.block_on(body(api)));
    match result.and_then(|r| r) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("outriderctl: {e}");
            e.exit_code()
        }
    }
}

/// `outriderctl apply -f FILE...`: prints each document's diff against the version in force
/// and pushes it; exits 1 if any is rejected (its problems printed with carets).
pub fn apply(args: ApplyArgs) -> ExitCode {
    if args.name.is_some() && args.files.len() > 1 {
        eprintln!("outriderctl: --name names one document; give one file with it");
        return ExitCode::from(64);
    }
    let mut documents = Vec::new();
    for path in &args.files {
        let text = match std::fs::read_to_string(path) {
            Ok(text) => text,
            Err(e) => {
                eprintln!("outriderctl: cannot read {}: {e}", path.display());
                return ExitCode::from(EX_NOINPUT);
            }
        };
        let name = args.name.clone().unwrap_or_else(|| {
            path.file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default()
        });
        documents.push((name, text));
    }
    run(
        |api| async move {
            let mut code = ExitCode::SUCCESS;
            for (name, text) in documents {
                let mut path = format!(
                    "{}?name={}&{}={}",
                    api::APPLY_PATH,
                    encode(&name),
                    api::TIMEOUT_PARAM,
                    APPLY_DEADLINE.as_millis()
                );
                if args.dry_run {
                    path.push_str("&dry_run=1");
                }
                let (status, body) = match api.call(Method::POST, &path, Bytes::from(text)).await {
                    Err(CliError::Timeout(url)) if !args.dry_run => {
                        return Err(CliError::ApplyOutcomeUnknown { url, name })
                    }
                    other => other?,
                };
                match status {
                    StatusCode::OK => {
                        print_applied(&name, &decode::<Applied>(status, &body)?, args.dry_run)
                    }
                    StatusCode::UNPROCESSABLE_ENTITY => {
                        let rejected: Rejected = decode(status, &body)?;
                        eprint!("{}", rejected.rendered);
                        if args.dry_run {
                            eprintln!("outriderctl: {name} would be rejected");
                        } else {
                            eprintln!(
                                "outriderctl: {name} rejected; the version in force is unchanged"
                            );
                        }
                        code = ExitCode::from(EX_REJECTED);
                    }
                    StatusCode::INSUFFICIENT_STORAGE => {
                        return Err(CliError::StoreFailed {
                            name,
                            verb: "applied",
                            message: error_message(&body),
                        });
                    }
                    StatusCode::SERVICE_UNAVAILABLE | StatusCode::INTERNAL_SERVER_ERROR => {
                        return Err(CliError::NotApplied {
                            name,
                            verb: "applied",
                            message: error_message(&body),
                        });
                    }
                    _ => return Err(unexpected(status, &body)),
                }
            }
            Ok(code)
        },
        &args.remote,
    )
}

fn print_applied(name: &str, applied: &Applied, dry_run: bool) {
    if applied.unchanged {
        println!(
            "{name}: unchanged (identical to the version in force, {})",
            applied.version
        );
        return;
    }
    print!("{}", applied.diff);
    if dry_run {
        println!(
            "{name}: valid; would be version {} and change {} (dry run: nothing applied)",
            applied.version,
            workloads(applied)
        );
    } else {
        println!(
            "{name}: applied as version {}; pushed to {}",
            applied.version,
            workloads(applied)
        );
    }
}

fn workloads(applied: &Applied) -> String {
    if applied.workloads.is_empty() {
        return "no workload (no merged policy changes)".into();
    }
    let names: Vec<&str> = applied
        .workloads
        .iter()
        .map(|w| w.workload.as_str())
        .collect();
    format!("workloads {}", names.join(", "))
}

/// `outriderctl status`: documents (rejections included) and a table of proxies.
pub fn status(remote: Remote) -> ExitCode {
    run(
        |api| async move {
            let status: Status = api.get_json(Method::GET, api::STATUS_PATH).await?;
            print!("{}", render_status(&status));
            Ok(ExitCode::SUCCESS)
        },
        &remote,
    )
}

fn render_status(status: &Status) -> String {
    let mut out = format!("version in force: {}\n", status.version);
    if let Some(store) = &status.store {
        if let Some(error) = &store.error {
            let _ = writeln!(
                out,
                "state directory {} FAILING since {} ({} failed writes; no change is made until a write succeeds): {error}",
                store.dir,
                store.failing_since_ms.map_or_else(|| "-".into(), format_utc),
                store.write_failures,
            );
        }
        if let Some(pending) = &store.pending {
            let _ = writeln!(out, "not yet in force, retried until written: {pending}");
        }
    }
    out.push('\n');
    let mut rows = vec![[
        "PROXY".to_string(),
        "WORKLOAD".into(),
        "VERSION".into(),
        "APPLIED AT".into(),
        "STATE".into(),
        "LAST NACK".into(),
    ]];
    for p in &status.proxies {
        let dash = || "-".to_string();
        rows.push([
            p.proxy.clone(),
            p.workload.clone(),
            p.version_applied.map_or_else(dash, |v| v.to_string()),
            p.applied_at_ms.map_or_else(dash, format_utc),
            p.state.clone(),
            p.last_nack.as_ref().map_or_else(dash, |n| {
                format!("v{} at {}: {}", n.version, format_utc(n.at_ms), n.error)
            }),
        ]);
    }
    if status.proxies.is_empty() {
        out.push_str("no proxies have subscribed\n");
    } else {
        out.push_str(&table(&rows));
    }
    let rejected: Vec<_> = status
        .documents
        .iter()
        .filter_map(|d| d.rejected.as_ref())
        .collect();
    if !rejected.is_empty() {
        out.push_str("\nrejected documents (their previous version stays in force):\n");
        for r in rejected {
            let _ = writeln!(
                out,
                "  {}: {}",
                r.document,
                r.message.replace('\n', "\n    ")
            );
        }
    }
    out
}

/// `outriderctl history`: the kept versions, newest first.
pub fn history(remote: Remote) -> ExitCode {
    run(
        |api| async move {
            let history: Vec<HistoryEntry> = api.get_json(Method::GET, api::HISTORY_PATH).await?;
            let mut rows = vec![[
                "VERSION".to_string(),
                "AT".into(),
                "CAUSE".into(),
                "DOCUMENTS".into(),
            ]];
            for h in &history {
                rows.push([
                    h.version.to_string(),
                    format_utc(h.at_ms),
                    h.cause.clone(),
                    h.documents.join(", "),
                ]);
            }
            if history.is_empty() {
                println!("no versions yet");
            } else {
                print!("{}", table(&rows));
            }
            Ok(ExitCode::SUCCESS)
        },
        &remote,
    )
}

/// `outriderctl rollback --to N`.
pub fn rollback(args: RollbackArgs) -> ExitCode {
    run(
        |api| async move {
            let path = format!("{}?to={}", api::ROLLBACK_PATH, args.to);
            let (status, body) = api.call(Method::POST, &path, Bytes::new()).await?;
            match status {
                StatusCode::OK => {
                    let applied: Applied = decode(status, &body)?;
                    println!(
                        "rolled back to version {} as version {}; pushed to {}",
                        args.to,
                        applied.version,
                        workloads(&applied)
                    );
                    Ok(ExitCode::SUCCESS)
                }
                StatusCode::NOT_FOUND => {
                    let message = serde_json::from_slice::<ErrorBody>(&body)
                        .map(|e| e.error)
                        .unwrap_or_else(|_| format!("version {} is not kept", args.to));
                    eprintln!("outriderctl: {message} (see outriderctl history)");
                    Ok(ExitCode::from(EX_REJECTED))
                }
                StatusCode::INSUFFICIENT_STORAGE => Err(CliError::StoreFailed {
                    name: format!("version {}", args.to),
                    verb: "rolled back to",
                    message: error_message(&body),
                }),
                _ => Err(unexpected(status, &body)),
            }
        },
        &args.remote,
    )
}

/// `outriderctl delete NAME`: removes a document added with `apply`, as a new version;
/// exits 1 if it is not in force, comes from the policy directory, or its removal would leave
/// some workload's merged policy invalid.
pub fn delete(args: DeleteArgs) -> ExitCode {
    run(
        |api| async move {
            let name = args.name;
            let path = format!(
                "{}?name={}&{}={}",
                api::DELETE_PATH,
                encode(&name),
                api::TIMEOUT_PARAM,
                APPLY_DEADLINE.as_millis()
            );
            let (status, body) = match api.call(Method::POST, &path, Bytes::new()).await {
                Err(CliError::Timeout(url)) => {
                    return Err(CliError::DeleteOutcomeUnknown { url, name })
                }
                other => other?,
            };
            match status {
                StatusCode::OK => {
                    let applied: Applied = decode(status, &body)?;
                    println!(
                        "{name}: deleted as version {}; pushed to {}",
                        applied.version,
                        workloads(&applied)
                    );
                    Ok(ExitCode::SUCCESS)
                }
                StatusCode::NOT_FOUND | StatusCode::CONFLICT => {
                    eprintln!("outriderctl: {}", error_message(&body));
                    Ok(ExitCode::from(EX_REJECTED))
                }
                StatusCode::UNPROCESSABLE_ENTITY => {
                    let rejected: Rejected = decode(status, &body)?;
                    eprint!("{}", rejected.rendered);
                    eprintln!("outriderctl: {name} not deleted; the version in force is unchanged");
                    Ok(ExitCode::from(EX_REJECTED))
                }
                StatusCode::INSUFFICIENT_STORAGE => Err(CliError::StoreFailed {
                    name,
                    verb: "deleted",
                    message: error_message(&body),
                }),
                StatusCode::SERVICE_UNAVAILABLE | StatusCode::INTERNAL_SERVER_ERROR => {
                    Err(CliError::NotApplied {
                        name,
                        verb: "deleted",
                        message: error_message(&body),
                    })
                }
                _ => Err(unexpected(status, &body)),
            }
        },
        &args.remote,
    )
}

/// `outriderctl get WORKLOAD`: the merged policy as YAML, with its version and hash as a
/// comment.
pub fn get(args: GetArgs) -> ExitCode {
    run(
        |api| async move {
            let path = format!("{}?workload={}", api::POLICY_PATH, encode(&args.workload));
            let policy: WorkloadPolicy = api.get_json(Method::GET, &path).await?;
            println!(
                "# workload {}, version {}, sha256 {}",
                policy.workload, policy.version, policy.content_hash
            );
            print!("{}", policy.policy);
            Ok(ExitCode::SUCCESS)
        },
        &args.remote,
    )
}

/// Percent-encodes everything but unreserved characters.
fn encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(char::from(b));
        } else {
            let _ = write!(out, "%{b:02X}");
        }
    }
    out
}

/// Left-aligned columns separated by two spaces.
fn table<const N: usize>(rows: &[[String; N]]) -> String {
    let mut widths = [0usize; N];
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    for row in rows {
        let mut line = String::new();
        for (i, (cell, w)) in row.iter().zip(widths).enumerate() {
            if i + 1 == N {
                line.push_str(cell);
            } else {
                let _ = write!(line, "{cell:<w$}  ");
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::{Nack, ProxyStatus};

    #[test]
    fn status_table_aligns_and_lists_nacks() {
        let proxy = |id: &str, state: &str, nack: Option<Nack>| ProxyStatus {
            proxy: id.into(),
            workload: "checkout".into(),
            connected: true,
            connected_since_ms: 0,
            version_sent: Some(3),
            version_applied: Some(2),
            applied_at_ms: Some(0),
            last_nack: nack,
            state: state.into(),
        };
        let status = Status {
            store: None,
            version: 3,
            documents: vec![],
            proxies: vec![
                proxy("pod-a", "in-sync", None),
                proxy(
                    "pod-long-name",
                    "nack",
                    Some(Nack {
                        version: 3,
                        error: "port taken".into(),
                        at_ms: 0,
                    }),
                ),
            ],
        };
        let text = render_status(&status);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines[0], "version in force: 3");
        assert!(
            lines[2].starts_with("PROXY          WORKLOAD  VERSION"),
            "{text}"
        );
        assert!(lines[3].starts_with("pod-a          checkout  2"), "{text}");
        assert!(
            lines[4].ends_with("nack     v3 at 1970-01-01T00:00:00Z: port taken"),
            "{text}"
        );
    }

    #[test]
    fn status_names_a_failing_state_directory_and_the_pending_change() {
        let mut status = Status {
            version: 3,
            documents: vec![],
            proxies: vec![],
            store: Some(api::StoreStatus {
                dir: "/var/lib/outrider".into(),
                healthy: false,
                error: Some("cannot create /var/lib/outrider/state.json.tmp: Read-only file system (os error 30)".into()),
                failing_since_ms: Some(0),
                write_failures: 2,
                pending: Some("files changed: a.yaml".into()),
            }),
        };
        let text = render_status(&status);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(
            lines[1],
            "state directory /var/lib/outrider FAILING since 1970-01-01T00:00:00Z (2 failed writes; no change is made until a write succeeds): cannot create /var/lib/outrider/state.json.tmp: Read-only file system (os error 30)"
        );
        assert_eq!(
            lines[2],
            "not yet in force, retried until written: files changed: a.yaml"
        );
        status.store = Some(api::StoreStatus {
            healthy: true,
            error: None,
            failing_since_ms: None,
            pending: None,
            ..status.store.clone().expect("store")
        });
        assert_eq!(
            render_status(&status),
            "version in force: 3\n\nno proxies have subscribed\n"
        );
    }

    #[test]
    fn names_are_percent_encoded() {
        assert_eq!(encode("a b/c.yaml"), "a%20b%2Fc.yaml");
        assert_eq!(encode("*"), "%2A");
    }
}
