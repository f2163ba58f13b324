//! The `outriderctl` commands that talk to the control plane: `apply`, `status`, `history`,
//! `rollback`, `delete`, `get`, `check`, `version`. Exit codes: 0 success, 1 rejected (invalid
//! or conflicting policy, unknown version, a document not in force or from the policy
//! directory, an unknown workload), 4 `apply --wait`: some proxy NACKed or did not answer in
//! time, 64 bad usage, 66 unreadable file, 69 control plane unreachable, change not made (its
//! deadline passed) or outcome unknown, 70 unexpected answer, 74 change not made because the
//! control plane cannot write its state directory, 75 change not made because the control
//! plane's store (etcd) is unavailable (the replica is read-only; try again once etcd is
//! back), 77 token refused. `check` has its own
//! (see [`crate::check`]).

use std::fmt::Write as _;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde::de::DeserializeOwned;

use crate::api::{
    self, format_utc, Applied, ErrorBody, HistoryEntry, Rejected, ServerVersion, Status,
    WorkloadPolicy,
};
use crate::output::{self, Format, OutputArg};

const EX_REJECTED: u8 = 1;
/// `apply --wait`: applied, but some proxy NACKed it or did not answer in time.
pub const EX_NOT_CONFIRMED: u8 = 4;
const EX_USAGE: u8 = 64;
const EX_NOINPUT: u8 = 66;
const EX_UNAVAILABLE: u8 = 69;
const EX_SOFTWARE: u8 = 70;
const EX_IOERR: u8 = 74;
/// EX_TEMPFAIL: the change was refused because etcd is unavailable; retrying later works.
pub const EX_STORE_UNAVAILABLE: u8 = 75;
const EX_NOPERM: u8 = 77;

/// Bound on one request to the control plane.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest wait for a TCP connection to one replica: past it, the next URL is tried.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// The deadline `apply` gives the server: shorter than [`REQUEST_TIMEOUT`] by the time a
/// commit and its answer may take, so the server gives up on a change before we do.
const APPLY_DEADLINE: Duration = Duration::from_secs(8);

/// Where the control plane is and how to authenticate.
#[derive(Debug, Clone, clap::Args)]
pub struct Remote {
    /// The control plane's URL. Several replicas: comma-separated or the flag repeated; a
    /// command moves to the next only while one cannot be reached (refused, or no connection
    /// within 3s), never past an answer.
    #[arg(
        long,
        env = "OUTRIDER_CONTROL_URL",
        value_delimiter = ',',
        default_value = "http://127.0.0.1:15010"
    )]
    pub server: Vec<String>,
    /// File holding the token; or set OUTRIDER_CONTROL_TOKEN.
    #[arg(long, env = "OUTRIDER_CONTROL_TOKEN_FILE")]
    pub token_file: Option<PathBuf>,
}

/// `outriderctl apply` flags.
#[derive(Debug, Clone, clap::Args)]
pub struct ApplyArgs {
    /// Policy documents to apply: files, directories (their `*.yaml`/`*.yml`), or `-` for
    /// stdin (with --name); each is named by its file name unless --name is given.
    #[arg(short = 'f', long = "file", required = true)]
    pub files: Vec<PathBuf>,
    /// Wait until every connected proxy of each changed workload has ACKed the new version
    /// (default 60s); exit 4 naming the proxies that NACKed (with the reason) or did not
    /// answer in time.
    #[arg(long, value_name = "TIMEOUT", num_args = 0..=1, require_equals = true,
          default_missing_value = "60s")]
    pub wait: Option<outrider_config::Duration>,
    /// Override a document read from the policy directory (refused otherwise): the applied
    /// text wins until `outriderctl delete NAME` hands the document back to the file.
    #[arg(long)]
    pub force: bool,
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
    /// Print the route table instead: every route match in the order the proxy tries them
    /// (the first a request meets takes it), with backends, weights, timeouts, retries and
    /// filters.
    #[arg(long)]
    pub routes: bool,
    #[command(flatten)]
    #[allow(missing_docs)]
    pub output: OutputArg,
    #[command(flatten)]
    #[allow(missing_docs)]
    pub remote: Remote,
}

/// `outriderctl status` flags.
#[derive(Debug, Clone, clap::Args)]
pub struct StatusArgs {
    /// Also list disconnected proxies (kept until --registry-expiry, default 5 min).
    #[arg(long)]
    pub all: bool,
    #[command(flatten)]
    #[allow(missing_docs)]
    pub output: OutputArg,
    #[command(flatten)]
    #[allow(missing_docs)]
    pub remote: Remote,
}

/// Flags of the read commands without others (`history`, `check`, `version`).
#[derive(Debug, Clone, clap::Args)]
pub struct ReadArgs {
    #[command(flatten)]
    #[allow(missing_docs)]
    pub output: OutputArg,
    #[command(flatten)]
    #[allow(missing_docs)]
    pub remote: Remote,
}

/// Why a command failed.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    /// Nothing answers at the URL, nor at any other given.
    #[error("cannot reach the control plane at {url}: {reason} (is outrider-control running? set --server or OUTRIDER_CONTROL_URL)")]
    Unreachable {
        /// The URLs tried, comma-separated.
        url: String,
        /// The innermost cause (`Connection refused`...), after each URL's when several.
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
    /// The control plane's store (etcd) is unavailable, so the replica is read-only (503 of
    /// kind `store-unavailable`): nothing changed.
    #[error("{name} not {verb}: {message}")]
    StoreUnavailable {
        /// The document, or `version N` for a rollback.
        name: String,
        /// `applied`, `deleted` or `rolled back to`.
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
            Self::StoreUnavailable { .. } => EX_STORE_UNAVAILABLE,
            Self::TokenFile { .. } => EX_NOINPUT,
            Self::BadUrl(_) => 64,
            Self::Unexpected { .. } => EX_SOFTWARE,
        })
    }
}

/// A connection to the control plane's API, at the first of its replicas that can be reached.
struct Api {
    /// Every replica's URL, in the order given.
    bases: Vec<String>,
    /// The index in `bases` of the replica that answered last: the next request starts there,
    /// so one command's requests (`apply --wait`'s polls) stay on one replica's view.
    current: AtomicUsize,
    token: Option<String>,
    client: Client<HttpConnector, Full<Bytes>>,
}

/// How one request to one replica failed.
enum Failure {
    /// No connection (refused, no route, [`CONNECT_TIMEOUT`]): nothing was sent, so the next
    /// replica may be asked.
    Unreachable(String),
    /// Anything else: the request may have been received, so it is not sent again.
    Other(CliError),
}

impl Api {
    fn new(remote: &Remote) -> Result<Self, CliError> {
        let bases = remote
            .server
            .iter()
            .map(|url| {
                let base = url.trim().trim_end_matches('/');
                if base.starts_with("http://") {
                    Ok(base.to_string())
                } else {
                    Err(CliError::BadUrl(url.clone()))
                }
            })
            .collect::<Result<Vec<_>, _>>()?;
        if bases.is_empty() {
            return Err(CliError::BadUrl(String::new()));
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
        let mut connector = HttpConnector::new();
        connector.set_connect_timeout(Some(CONNECT_TIMEOUT));
        Ok(Self {
            bases,
            current: AtomicUsize::new(0),
            token,
            client: Client::builder(TokioExecutor::new()).build(connector),
        })
    }

    /// The URL of the replica that answered last (the first given before any answered).
    fn base(&self) -> &str {
        let i = self.current.load(Ordering::Relaxed);
        self.bases
            .get(i)
            .or(self.bases.first())
            .map_or("", String::as_str)
    }

    /// Sends a request to the replica that answered last, and to the next ones while one
    /// cannot be reached; 401 and transport failures become errors, any other status is
    /// returned with the body.
    async fn call(
        &self,
        method: Method,
        path: &str,
        body: Bytes,
    ) -> Result<(StatusCode, Bytes), CliError> {
        let start = self.current.load(Ordering::Relaxed);
        let mut unreachable: Vec<(&str, String)> = Vec::new();
        let count = self.bases.len();
        for k in 0..count {
            let i = (start + k) % count;
            let base = &self.bases[i];
            match self
                .call_one(base, method.clone(), path, body.clone())
                .await
            {
                Ok(answer) => {
                    self.current.store(i, Ordering::Relaxed);
                    return Ok(answer);
                }
                Err(Failure::Other(error)) => return Err(error),
                Err(Failure::Unreachable(reason)) => {
                    if k + 1 < count {
                        eprintln!(
                            "outriderctl: cannot reach {base}: {reason}; trying the next --server"
                        );
                    }
                    unreachable.push((base, reason));
                }
            }
        }
        Err(unreachable_error(&unreachable))
    }

    /// One request to the replica at `base`.
    async fn call_one(
        &self,
        base: &str,
        method: Method,
        path: &str,
        body: Bytes,
    ) -> Result<(StatusCode, Bytes), Failure> {
        let mut req = Request::builder()
            .method(method)
            .uri(format!("{base}{path}"));
        if let Some(token) = &self.token {
            req = req.header(http::header::AUTHORIZATION, format!("Bearer {token}"));
        }
        let req = req
            .body(Full::new(body))
            .map_err(|_| Failure::Other(CliError::BadUrl(base.to_string())))?;
        let exchange = async {
            let res = self.client.request(req).await.map_err(|e| {
                if e.is_connect() {
                    Failure::Unreachable(root_cause(&e))
                } else {
                    Failure::Other(CliError::Unreachable {
                        url: base.to_string(),
                        reason: root_cause(&e),
                    })
                }
            })?;
            let status = res.status();
            let body = res.into_body().collect().await.map_err(|e| {
                Failure::Other(CliError::Unreachable {
                    url: base.to_string(),
                    reason: root_cause(&e),
                })
            })?;
            Ok((status, body.to_bytes()))
        };
        let (status, body) = tokio::time::timeout(REQUEST_TIMEOUT, exchange)
            .await
            .map_err(|_| Failure::Other(CliError::Timeout(base.to_string())))??;
        if status == StatusCode::UNAUTHORIZED {
            return Err(Failure::Other(CliError::Unauthorized {
                url: base.to_string(),
                had_token: self.token.is_some(),
            }));
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

/// Every replica given was unreachable: each one's reason.
fn unreachable_error(tried: &[(&str, String)]) -> CliError {
    let url = tried
        .iter()
        .map(|(url, _)| *url)
        .collect::<Vec<_>>()
        .join(",");
    let reason = match tried {
        [(_, reason)] => reason.clone(),
        _ => tried
            .iter()
            .map(|(url, reason)| format!("{url}: {reason}"))
            .collect::<Vec<_>>()
            .join("; "),
    };
    CliError::Unreachable { url, reason }
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

/// A change the control plane did not make: [`CliError::StoreUnavailable`] when its store is
/// unavailable, else [`CliError::NotApplied`].
fn not_made(name: String, verb: &'static str, body: &[u8]) -> CliError {
    match serde_json::from_slice::<ErrorBody>(body) {
        Ok(ErrorBody {
            error,
            kind: Some(kind),
        }) if kind == api::STORE_UNAVAILABLE => CliError::StoreUnavailable {
            name,
            verb,
            message: error,
        },
        _ => CliError::NotApplied {
            name,
            verb,
            message: error_message(body),
        },
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

/// `outriderctl apply -f FILE|DIR|-...`: prints each document's diff against the version in
/// force and pushes it; exits 1 if any is rejected (its problems printed with carets). With
/// `--wait`, then waits for the proxies' ACKs (exit 4 if some NACK or do not answer).
pub fn apply(args: ApplyArgs) -> ExitCode {
    let documents = match read_documents(&args.files, args.name.as_deref()) {
        Ok(documents) => documents,
        Err((code, message)) => {
            eprintln!("outriderctl: {message}");
            return ExitCode::from(code);
        }
    };
    let colour = output::stdout_colour();
    run(
        |api| async move {
            let mut code = ExitCode::SUCCESS;
            let mut changed: Vec<api::WorkloadVersion> = Vec::new();
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
                if args.force {
                    let _ = write!(path, "&{}=1", api::FORCE_PARAM);
                }
                let (status, body) = match api.call(Method::POST, &path, Bytes::from(text)).await {
                    Err(CliError::Timeout(url)) if !args.dry_run => {
                        return Err(CliError::ApplyOutcomeUnknown { url, name })
                    }
                    other => other?,
                };
                match status {
                    StatusCode::OK => {
                        let applied = decode::<Applied>(status, &body)?;
                        print_applied(&name, &applied, args.dry_run, colour);
                        if !args.dry_run {
                            changed.extend(applied.workloads);
                        }
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
                    StatusCode::CONFLICT => {
                        eprintln!("outriderctl: {}", error_message(&body));
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
                        return Err(not_made(name, "applied", &body));
                    }
                    _ => return Err(unexpected(status, &body)),
                }
            }
            if let Some(timeout) = args.wait.filter(|_| !args.dry_run) {
                let waited = wait_for_acks(&api, &changed, timeout.get()).await?;
                if waited != ExitCode::SUCCESS {
                    return Ok(waited);
                }
            }
            Ok(code)
        },
        &args.remote,
    )
}

/// The documents of `-f` arguments: a file, every `*.yaml`/`*.yml` of a directory (name
/// order, hidden files skipped), or `-` for stdin (named by `--name`).
fn read_documents(
    paths: &[PathBuf],
    name: Option<&str>,
) -> Result<Vec<(String, String)>, (u8, String)> {
    let mut files = Vec::new();
    for path in paths {
        if path.as_os_str() == "-" {
            files.push(path.clone());
        } else if path.is_dir() {
            let entries = std::fs::read_dir(path)
                .map_err(|e| (EX_NOINPUT, format!("cannot read {}: {e}", path.display())))?;
            let mut found: Vec<PathBuf> = entries
                .filter_map(Result::ok)
                .map(|e| e.path())
                .filter(|p| {
                    let name = p
                        .file_name()
                        .map(|n| n.to_string_lossy())
                        .unwrap_or_default();
                    !name.starts_with('.')
                        && (name.ends_with(".yaml") || name.ends_with(".yml"))
                        && p.is_file()
                })
                .collect();
            if found.is_empty() {
                return Err((
                    EX_NOINPUT,
                    format!("{} holds no *.yaml or *.yml file", path.display()),
                ));
            }
            found.sort();
            files.extend(found);
        } else {
            files.push(path.clone());
        }
    }
    if name.is_some() && files.len() > 1 {
        return Err((
            EX_USAGE,
            "--name names one document; give one file with it".into(),
        ));
    }
    let mut documents = Vec::new();
    for path in files {
        let stdin = path.as_os_str() == "-";
        let text = if stdin {
            std::io::read_to_string(std::io::stdin())
                .map_err(|e| (EX_NOINPUT, format!("cannot read stdin: {e}")))?
        } else {
            std::fs::read_to_string(&path)
                .map_err(|e| (EX_NOINPUT, format!("cannot read {}: {e}", path.display())))?
        };
        let doc_name = match (name, stdin) {
            (Some(name), _) => name.to_string(),
            (None, true) => {
                return Err((
                    EX_USAGE,
                    "a document read from stdin (-f -) needs --name".into(),
                ))
            }
            (None, false) => path
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default(),
        };
        documents.push((doc_name, text));
    }
    Ok(documents)
}

/// How often `apply --wait` looks at the proxies.
const WAIT_POLL: Duration = Duration::from_millis(100);

/// Waits until every connected proxy of the `changed` workloads ACKed its workload's new
/// version, printing each answer on stderr; [`EX_NOT_CONFIRMED`] naming the proxies that
/// NACKed (and why), went away, or did not answer within `timeout`.
async fn wait_for_acks(
    api: &Api,
    changed: &[api::WorkloadVersion],
    timeout: Duration,
) -> Result<ExitCode, CliError> {
    let mut targets: std::collections::BTreeMap<&str, u64> = std::collections::BTreeMap::new();
    for w in changed {
        let v = targets.entry(w.workload.as_str()).or_insert(w.version);
        *v = (*v).max(w.version);
    }
    if targets.is_empty() {
        eprintln!("no workload's policy changed: nothing to wait for");
        return Ok(ExitCode::SUCCESS);
    }
    let started = tokio::time::Instant::now();
    let deadline = started + timeout;
    // Proxy id -> (workload, outcome once known).
    let mut answers: std::collections::BTreeMap<String, (String, Option<Result<(), String>>)> =
        std::collections::BTreeMap::new();
    let mut announced = false;
    loop {
        let status: Status = api.get_json(Method::GET, api::STATUS_PATH).await?;
        for p in &status.proxies {
            let Some(&version) = targets.get(p.workload.as_str()) else {
                continue;
            };
            let entry = match answers.get_mut(&p.proxy) {
                Some(entry) => entry,
                None if p.connected => answers
                    .entry(p.proxy.clone())
                    .or_insert_with(|| (p.workload.clone(), None)),
                None => continue,
            };
            if entry.1.is_some() {
                continue;
            }
            let took = started.elapsed().as_secs_f64();
            if p.version_applied.is_some_and(|v| v >= version) {
                eprintln!(
                    "  {} ({}) ACKed version {version} after {took:.1} s",
                    p.proxy, p.workload
                );
                entry.1 = Some(Ok(()));
            } else if let Some(nack) = p.last_nack.as_ref().filter(|n| n.version >= version) {
                eprintln!(
                    "  {} ({}) NACKed version {}: {}",
                    p.proxy, p.workload, nack.version, nack.error
                );
                entry.1 = Some(Err(format!(
                    "NACKed version {}: {}",
                    nack.version, nack.error
                )));
            } else if !p.connected {
                eprintln!(
                    "  {} ({}) disconnected before answering",
                    p.proxy, p.workload
                );
                entry.1 = Some(Err("disconnected before answering".into()));
            }
        }
        if !announced && !answers.is_empty() {
            let names: Vec<String> = targets
                .iter()
                .map(|(w, v)| format!("{w} (version {v})"))
                .collect();
            eprintln!(
                "waiting up to {timeout:?} for {} connected prox{} of {} to answer",
                answers.len(),
                if answers.len() == 1 { "y" } else { "ies" },
                names.join(", ")
            );
            announced = true;
        }
        let open = answers.values().filter(|(_, a)| a.is_none()).count();
        if open == 0 || tokio::time::Instant::now() >= deadline {
            break;
        }
        tokio::time::sleep_until((tokio::time::Instant::now() + WAIT_POLL).min(deadline)).await;
    }
    let mut failed = Vec::new();
    for (proxy, (workload, answer)) in &answers {
        match answer {
            Some(Ok(())) => {}
            Some(Err(why)) => failed.push(format!("{proxy} ({workload}) {why}")),
            None => failed.push(format!(
                "{proxy} ({workload}) did not answer within {timeout:?}"
            )),
        }
    }
    if answers.is_empty() {
        eprintln!("no connected proxy runs a changed workload: nothing to wait for");
        return Ok(ExitCode::SUCCESS);
    }
    if failed.is_empty() {
        eprintln!(
            "every connected proxy ({}) applied the new version",
            answers.len()
        );
        return Ok(ExitCode::SUCCESS);
    }
    eprintln!(
        "outriderctl: applied, but {} of {} proxies did not apply it (they keep their previous policy):",
        failed.len(),
        answers.len()
    );
    for f in failed {
        eprintln!("  {f}");
    }
    Ok(ExitCode::from(EX_NOT_CONFIRMED))
}

fn print_applied(name: &str, applied: &Applied, dry_run: bool, colour: bool) {
    for warning in &applied.warnings {
        eprintln!("outriderctl: warning: {warning}");
    }
    if applied.unchanged {
        println!(
            "{name}: unchanged (identical to the version in force, {})",
            applied.version
        );
        return;
    }
    print!("{}", output::paint_diff(colour, &applied.diff));
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

/// `outriderctl status`: documents (rejections included) and a table of proxies; the
/// disconnected ones only with `--all`.
pub fn status(args: StatusArgs) -> ExitCode {
    run(
        |api| async move {
            let mut status: Status = api.get_json(Method::GET, api::STATUS_PATH).await?;
            let hidden = if args.all {
                0
            } else {
                let before = status.proxies.len();
                status.proxies.retain(|p| p.connected);
                before - status.proxies.len()
            };
            match output::structured(args.output.output, &status) {
                Some(text) => print!("{text}"),
                None => {
                    print!("{}", render_status(&status));
                    if hidden > 0 {
                        println!(
                            "({hidden} disconnected prox{} not shown: --all lists {})",
                            if hidden == 1 { "y" } else { "ies" },
                            if hidden == 1 { "it" } else { "them" }
                        );
                    }
                }
            }
            Ok(ExitCode::SUCCESS)
        },
        &args.remote,
    )
}

fn render_status(status: &Status) -> String {
    let mut out = format!("version in force: {}\n", status.version);
    let replicated = status.replica.as_ref().filter(|r| r.replicated);
    if let Some(replica) = replicated {
        let _ = writeln!(
            out,
            "replica {}: {}",
            replica.name,
            if replica.leader {
                "leader: true (imports the policy directory)"
            } else {
                "leader: false (another replica imports the policy directory)"
            }
        );
        if replica.view_stale {
            let _ = writeln!(
                out,
                "view STALE: behind etcd for {}s (its watch is down: changes made on other replicas are not shown or pushed from here)",
                replica.view_behind_ms.unwrap_or_default() / 1000
            );
        }
        if let Some(error) = &replica.other_replicas_error {
            let _ = writeln!(out, "only this replica's proxies are listed: {error}");
        }
    }
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
        "REPLICA".into(),
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
            p.replica.clone().unwrap_or_else(dash),
        ]);
    }
    if replicated.is_none() {
        // One replica: the column says nothing.
        for row in &mut rows {
            row[6] = String::new();
        }
    }
    if status.proxies.is_empty() {
        out.push_str("no proxies connected\n");
    } else {
        out.push_str(&table(&rows));
    }
    let overriding: Vec<_> = status
        .documents
        .iter()
        .filter(|d| d.overrides_file)
        .collect();
    if !overriding.is_empty() {
        out.push_str("\napplied documents overriding a policy file (`outriderctl delete NAME` hands one back to its file):\n");
        for d in overriding {
            let _ = writeln!(
                out,
                "  {}{}",
                d.name,
                if d.file_differs {
                    " (the file differs: its text is not in force)"
                } else {
                    ""
                }
            );
        }
    }
    let rejected: Vec<_> = status
        .documents
        .iter()
        .filter_map(|d| d.rejected.as_ref())
        .collect();
    if !rejected.is_empty() {
        out.push_str("\nrejected documents (their previous version stays in force):\n");
        for r in rejected {
            // A conflict's message names its document already.
            let message = crate::check::strip_name(&r.message, &r.document);
            let _ = writeln!(out, "  {}: {}", r.document, message.replace('\n', "\n    "));
        }
    }
    out
}

/// `outriderctl history`: the kept versions, newest first.
pub fn history(args: ReadArgs) -> ExitCode {
    run(
        |api| async move {
            let history: Vec<HistoryEntry> = api.get_json(Method::GET, api::HISTORY_PATH).await?;
            if let Some(text) = output::structured(args.output.output, &history) {
                print!("{text}");
                return Ok(ExitCode::SUCCESS);
            }
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
        &args.remote,
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
                StatusCode::SERVICE_UNAVAILABLE => Err(not_made(
                    format!("version {}", args.to),
                    "rolled back to",
                    &body,
                )),
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
                    if applied.unchanged {
                        println!("{name}: its rejection is cleared (it was never in force)");
                    } else {
                        println!(
                            "{name}: deleted as version {}; pushed to {}",
                            applied.version,
                            workloads(&applied)
                        );
                    }
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
                    Err(not_made(name, "deleted", &body))
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
            if !policy.named && !policy.running {
                eprintln!(
                    "outriderctl: no document names workload `{}` and no connected proxy runs it (a typo? `outriderctl status` lists the workloads; `outriderctl get '*'` shows what an unnamed workload receives)",
                    args.workload
                );
                return Ok(ExitCode::from(EX_REJECTED));
            }
            if args.routes {
                return print_routes(args.output.output, &policy);
            }
            if let Some(text) = output::structured(args.output.output, &policy) {
                print!("{text}");
                return Ok(ExitCode::SUCCESS);
            }
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

/// `outriderctl get WORKLOAD --routes -o json`'s document.
#[derive(Debug, serde::Serialize)]
struct WorkloadRoutes<'a> {
    workload: &'a str,
    version: u64,
    content_hash: &'a str,
    routes: Vec<crate::routes::Entry>,
}

/// Prints the route table of a workload's policy, compiled as its proxies compile it.
fn print_routes(format: Format, policy: &WorkloadPolicy) -> Result<ExitCode, CliError> {
    let loaded = match outrider_config::load(&policy.workload, &policy.policy) {
        Ok(loaded) => loaded,
        Err(error) => {
            // The control plane pushes only valid policies: a CLI older than the server?
            eprintln!(
                "outriderctl: the policy of workload `{}` does not load here: {error}",
                policy.workload
            );
            return Ok(ExitCode::from(EX_SOFTWARE));
        }
    };
    let table = crate::routes::table(&loaded.policy);
    let document = WorkloadRoutes {
        workload: &policy.workload,
        version: policy.version,
        content_hash: &policy.content_hash,
        routes: table.entries.clone(),
    };
    if let Some(text) = output::structured(format, &document) {
        print!("{text}");
        return Ok(ExitCode::SUCCESS);
    }
    println!(
        "# workload {}, version {}, sha256 {}: route matches in the order they are tried; the first a request meets takes it",
        policy.workload, policy.version, policy.content_hash
    );
    print!("{}", crate::routes::render(&table));
    Ok(ExitCode::SUCCESS)
}

/// `outriderctl check`: every problem the control plane's status shows, each with a fix;
/// exit 0 (none), 1 (an error) or 2 (warnings only).
pub fn check(args: ReadArgs) -> ExitCode {
    let colour = output::stdout_colour();
    run(
        |api| async move {
            let (version, skew) = server_version(&api).await?;
            let status: Status = api.get_json(Method::GET, api::STATUS_PATH).await?;
            let report = crate::check::report(&status, api.base(), &version.version, skew);
            match output::structured(args.output.output, &report) {
                Some(text) => print!("{text}"),
                None => print!("{}", crate::check::render(&report, colour)),
            }
            Ok(ExitCode::from(report.exit_code()))
        },
        &args.remote,
    )
}

/// The control plane's version, and its clock minus ours in ms (ours read either side of the
/// request, compared at the middle).
async fn server_version(api: &Api) -> Result<(ServerVersion, i64), CliError> {
    let before = api::now_ms();
    let version: ServerVersion = api.get_json(Method::GET, api::VERSION_PATH).await?;
    let after = api::now_ms();
    let middle = before.saturating_add(after.saturating_sub(before) / 2);
    let skew = i64::try_from(version.now_ms)
        .unwrap_or(i64::MAX)
        .saturating_sub(i64::try_from(middle).unwrap_or(i64::MAX));
    Ok((version, skew))
}

/// `outriderctl version -o json`'s document.
#[derive(Debug, serde::Serialize)]
struct Versions {
    client: String,
    server: ServerVersion,
    server_url: String,
}

/// `outriderctl version`: this CLI's version and the control plane's.
pub fn version(args: ReadArgs) -> ExitCode {
    let client = env!("CARGO_PKG_VERSION");
    if args.output.output == Format::Text {
        println!("client: outriderctl {client}");
    }
    run(
        |api| async move {
            let (server, _) = server_version(&api).await?;
            let versions = Versions {
                client: client.to_string(),
                server_url: api.base().to_string(),
                server,
            };
            match output::structured(args.output.output, &versions) {
                Some(text) => print!("{text}"),
                None => println!(
                    "server: outrider-control {} ({})",
                    versions.server.version, versions.server_url
                ),
            }
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
            pending_since_ms: None,
            workload_named: true,
            disconnected_at_ms: None,
            replica: None,
        };
        let status = Status {
            replica: None,
            certificates: None,
            now_ms: 0,
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
            replica: None,
            certificates: None,
            now_ms: 0,
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
            "version in force: 3\n\nno proxies connected\n"
        );
    }

    /// A port nothing listens on (bound, then released).
    fn dead_url() -> String {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = listener.local_addr().expect("addr");
        drop(listener);
        format!("http://{addr}")
    }

    /// A replica that answers every request with `status` and `body`, and counts them.
    async fn answering(
        status: &'static str,
        body: &'static str,
    ) -> (String, std::sync::Arc<AtomicUsize>) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let url = format!("http://{}", listener.local_addr().expect("addr"));
        let hits = std::sync::Arc::new(AtomicUsize::new(0));
        let counter = std::sync::Arc::clone(&hits);
        tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                counter.fetch_add(1, Ordering::SeqCst);
                let mut head = [0u8; 4096];
                let _ = stream.read(&mut head).await;
                let answer = format!(
                    "HTTP/1.1 {status}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = stream.write_all(answer.as_bytes()).await;
            }
        });
        (url, hits)
    }

    fn api(urls: &[&str]) -> Api {
        Api::new(&Remote {
            server: urls.iter().map(|u| u.to_string()).collect(),
            token_file: None,
        })
        .expect("valid URLs")
    }

    #[tokio::test]
    async fn an_unreachable_replica_is_passed_for_the_next_and_the_answer_sticks() {
        let dead = dead_url();
        let (live, hits) = answering("200 OK", "{}").await;
        let api = api(&[&dead, &live]);
        let (status, body) = api
            .call(Method::GET, "/v1/status", Bytes::new())
            .await
            .expect("the live replica answers");
        assert_eq!((status, &body[..]), (StatusCode::OK, &b"{}"[..]));
        assert_eq!(hits.load(Ordering::SeqCst), 1);
        // The next request starts at the replica that answered.
        assert_eq!(api.base(), live);
    }

    #[tokio::test]
    async fn an_error_answer_is_the_answer_and_no_other_replica_is_asked() {
        let (failing, failing_hits) =
            answering("503 Service Unavailable", "{\"error\":\"no\"}").await;
        let (live, live_hits) = answering("200 OK", "{}").await;
        let api = api(&[&failing, &live]);
        let (status, _) = api
            .call(Method::POST, "/v1/apply?name=x", Bytes::from_static(b"doc"))
            .await
            .expect("an answer");
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(failing_hits.load(Ordering::SeqCst), 1);
        assert_eq!(live_hits.load(Ordering::SeqCst), 0);
    }

    #[tokio::test]
    async fn every_replica_unreachable_names_each_with_its_reason() {
        let (one, two) = (dead_url(), dead_url());
        let error = api(&[&one, &two])
            .call(Method::GET, "/v1/status", Bytes::new())
            .await
            .expect_err("nothing listens");
        assert!(matches!(error, CliError::Unreachable { .. }), "{error}");
        let message = error.to_string();
        assert!(
            message.starts_with(&format!(
                "cannot reach the control plane at {one},{two}: {one}: Connection refused"
            )),
            "{message}"
        );
        assert!(
            message.contains(&format!("; {two}: Connection refused")),
            "{message}"
        );
        assert_eq!(error.exit_code(), ExitCode::from(EX_UNAVAILABLE));
    }

    #[test]
    fn server_urls_are_checked_each() {
        let remote = |urls: &[&str]| Remote {
            server: urls.iter().map(|u| u.to_string()).collect(),
            token_file: None,
        };
        assert!(Api::new(&remote(&["http://a:1/", " http://b:2"])).is_ok());
        assert!(matches!(
            Api::new(&remote(&["http://a:1", "https://b:2"])),
            Err(CliError::BadUrl(url)) if url == "https://b:2"
        ));
    }

    #[test]
    fn status_of_a_replica_says_whether_it_leads_its_view_is_stale_and_where_proxies_are() {
        let status = Status {
            replica: Some(api::ReplicaStatus {
                name: "r1".into(),
                leader: false,
                replicated: true,
                view_behind_ms: Some(12_500),
                view_stale: true,
                other_replicas_error: None,
            }),
            certificates: None,
            now_ms: 0,
            version: 3,
            documents: vec![],
            proxies: vec![ProxyStatus {
                proxy: "pod-a".into(),
                workload: "checkout".into(),
                connected: true,
                connected_since_ms: 0,
                version_sent: Some(3),
                version_applied: Some(3),
                applied_at_ms: Some(0),
                last_nack: None,
                state: "in-sync".into(),
                pending_since_ms: None,
                workload_named: true,
                disconnected_at_ms: None,
                replica: Some("r3".into()),
            }],
            store: None,
        };
        let text = render_status(&status);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(
            lines[1],
            "replica r1: leader: false (another replica imports the policy directory)"
        );
        assert!(
            lines[2].starts_with("view STALE: behind etcd for 12s"),
            "{text}"
        );
        assert!(lines[4].ends_with("LAST NACK  REPLICA"), "{text}");
        assert!(lines[5].ends_with("in-sync  -          r3"), "{text}");
        // A single replica (state directory) says nothing of it, nor of the column.
        let mut single = status.clone();
        single.replica = Some(api::ReplicaStatus {
            name: "r1".into(),
            leader: true,
            replicated: false,
            view_behind_ms: None,
            view_stale: false,
            other_replicas_error: None,
        });
        single.proxies[0].replica = None;
        let text = render_status(&single);
        assert!(!text.to_lowercase().contains("replica"), "{text}");
    }

    #[test]
    fn names_are_percent_encoded() {
        assert_eq!(encode("a b/c.yaml"), "a%20b%2Fc.yaml");
        assert_eq!(encode("*"), "%2A");
    }
}
