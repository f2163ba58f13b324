//! The OTLP span exporter: batches encoded to OTLP protobuf (by hand, see [`encode`]) and sent over
//! OTLP/gRPC or OTLP/HTTP (protobuf), plain or TLS, on one kept connection. What the OTLP
//! specification calls retryable is retried with capped exponential backoff and jitter,
//! honouring the collector's `Retry-After` (HTTP) or `RetryInfo` (gRPC) up to a cap; anything
//! else drops the batch at once. Failures are logged at WARN at most once per interval.
//!
//! Our own client rather than opentelemetry-otlp's: its exporter does not retry, and its error
//! is a string, so neither the retry decision nor the collector's delay could be read from it.

use std::future::Future;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use bytes::{BufMut, Bytes, BytesMut};
use http::header::{HeaderMap, HeaderValue, CONTENT_TYPE, HOST};
use http::{Method, Request, StatusCode, Uri};
use http_body_util::{BodyExt, Full, Limited};
use hyper::client::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo};
use opentelemetry::InstrumentationScope;
use opentelemetry_proto::tonic::common::v1::InstrumentationScope as ScopeMessage;
use opentelemetry_proto::tonic::resource::v1::Resource;
use opentelemetry_proto::transform::common::tonic::ResourceAttributesWithSchema;
use outrider_config::{Otlp, OtlpProtocol};
use prost::Message;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use rustls::{ClientConfig, RootCertStore};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio::sync::watch;
use tokio::time::Instant;

use crate::policy::backoff::ceiling;
use crate::telemetry::span::{pb, RequestSpan};

/// The first retry waits between half of this and this (equal jitter), doubling per retry.
const RETRY_BASE: Duration = Duration::from_millis(500);
/// The backoff's ceiling, and the longest a collector's `Retry-After` or `RetryInfo` is
/// honoured for: a collector asking for more gets this, then another try.
pub const RETRY_MAX_DELAY: Duration = Duration::from_secs(30);
/// Tries per batch at most (the first and five retries: about 16 s of backoff unless the
/// collector asks for longer); then the batch is dropped and counted. Meanwhile new spans wait
/// in the bounded span queue and are dropped when it is full.
pub const MAX_ATTEMPTS: u32 = 6;
/// At most one WARN per this long about failed exports; the ones in between are counted in it.
const WARN_INTERVAL: Duration = Duration::from_secs(10);
/// A TCP connect (and TLS handshake) to the collector.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// The collector's answer body read at most (an export answer is a few bytes).
const ANSWER_LIMIT: usize = 64 * 1024;
/// The gRPC method of an OTLP trace export.
const GRPC_PATH: &str = "/opentelemetry.proto.collector.trace.v1.TraceService/Export";

/// The exporter could not be set up from the policy and flags.
#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    /// The endpoint is not an http:// or https:// URL with a host.
    #[error("endpoint {0:?} is not an http:// or https:// URL with a host")]
    Endpoint(String),
    /// The CA file could not be read.
    #[error("cannot read the collector CA file {path}: {source}")]
    ReadCa {
        /// The file.
        path: String,
        /// Why.
        source: std::io::Error,
    },
    /// The CA file or the system store held no usable certificate.
    #[error("no trust roots for the collector ({0})")]
    NoRoots(String),
    /// The host is not a name or address TLS can verify.
    #[error("host {0:?} is not a valid TLS server name")]
    ServerName(String),
    /// rustls refused the settings.
    #[error(transparent)]
    Rustls(#[from] rustls::Error),
}

/// Why one export try failed.
#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    /// TCP connect failed.
    #[error("connect to {authority} failed: {source}")]
    Connect {
        /// host:port.
        authority: String,
        /// Why.
        source: std::io::Error,
    },
    /// TCP connect and TLS handshake did not finish in time.
    #[error("connect to {0} timed out")]
    ConnectTimeout(String),
    /// TLS handshake failed (untrusted certificate, wrong name, ...).
    #[error("TLS handshake with {authority} failed: {source}")]
    Tls {
        /// host:port.
        authority: String,
        /// Why.
        source: std::io::Error,
    },
    /// The HTTP exchange failed (connection reset, protocol error).
    #[error("HTTP exchange with the collector failed: {0}")]
    Http(#[from] hyper::Error),
    /// The collector answered a non-success HTTP status.
    #[error("collector answered HTTP {status}")]
    HttpStatus {
        /// The status.
        status: StatusCode,
        /// Its `Retry-After`, if any.
        retry_after: Option<Duration>,
    },
    /// The collector answered a gRPC error status.
    #[error("collector answered gRPC status {code}: {message}")]
    GrpcStatus {
        /// The gRPC code.
        code: u32,
        /// `grpc-message`.
        message: String,
        /// The delay of a `google.rpc.RetryInfo` in `grpc-status-details-bin`.
        retry_info: Option<Duration>,
    },
    /// No answer within the export timeout.
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    /// The answer could not be read (too long, no gRPC status).
    #[error("malformed answer: {0}")]
    Malformed(&'static str),
}

/// What to do after a failed try.
#[derive(Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Drop the batch.
    Drop,
    /// Retry, after the collector's delay if it gave one.
    Retry(Option<Duration>),
}

impl ExportError {
    /// The OTLP specification's rule: transport failures, HTTP 429/502/503/504 and the gRPC
    /// codes CANCELLED, DEADLINE_EXCEEDED, ABORTED, OUT_OF_RANGE, UNAVAILABLE, DATA_LOSS are
    /// retried; RESOURCE_EXHAUSTED only when the collector sent a `RetryInfo` (it can recover).
    pub fn verdict(&self) -> Verdict {
        match self {
            Self::Connect { .. } | Self::ConnectTimeout(_) | Self::Http(_) | Self::Timeout(_) => {
                Verdict::Retry(None)
            }
            Self::HttpStatus {
                status,
                retry_after,
            } => match status.as_u16() {
                429 | 502 | 503 | 504 => Verdict::Retry(*retry_after),
                _ => Verdict::Drop,
            },
            Self::GrpcStatus {
                code, retry_info, ..
            } => match code {
                1 | 4 | 10 | 11 | 14 | 15 => Verdict::Retry(*retry_info),
                8 if retry_info.is_some() => Verdict::Retry(*retry_info),
                _ => Verdict::Drop,
            },
            Self::Tls { .. } | Self::Malformed(_) => Verdict::Drop,
        }
    }
}

/// Sends one encoded batch; the seam between the retry loop and the network.
pub trait Transport {
    /// One try.
    fn send(&mut self, batch: &Bytes) -> impl Future<Output = Result<(), ExportError>> + Send;
}

/// The wait before retry number `retry` (1-based): the collector's delay if it asked for one
/// (capped), else equal jitter under the capped exponential ceiling; `roll` is in [0, 1).
pub fn retry_delay(retry: u32, asked: Option<Duration>, roll: f64) -> Duration {
    match asked {
        Some(asked) => asked.min(RETRY_MAX_DELAY),
        None => {
            let ceiling = ceiling(RETRY_BASE, RETRY_MAX_DELAY, retry.saturating_sub(1));
            let half = ceiling / 2;
            half + half.mul_f64(roll.clamp(0.0, 1.0))
        }
    }
}

/// Sends `batch`, retrying what [`ExportError::verdict`] allows up to [`MAX_ATTEMPTS`] tries.
/// Once `stop` is set (shutdown) no more waits: one more immediate try at most.
pub async fn deliver<T: Transport>(
    transport: &mut T,
    batch: &Bytes,
    stop: &mut watch::Receiver<bool>,
) -> Result<(), ExportError> {
    let mut tries: u32 = 0;
    loop {
        tries = tries.saturating_add(1);
        let error = match transport.send(batch).await {
            Ok(()) => return Ok(()),
            Err(error) => error,
        };
        let Verdict::Retry(asked) = error.verdict() else {
            return Err(error);
        };
        if tries >= MAX_ATTEMPTS || *stop.borrow() {
            return Err(error);
        }
        let delay = retry_delay(tries, asked, fastrand::f64());
        tracing::debug!(%error, ?delay, tries, "span export failed; retrying");
        tokio::select! {
            () = tokio::time::sleep(delay) => {}
            () = crate::core::shutdown::stopped(stop) => {}
        }
    }
}

/// WARN about failed exports at a bounded rate, with the reason.
#[derive(Default)]
pub struct FailureLog {
    last: Option<Instant>,
    suppressed: u64,
}

impl FailureLog {
    /// Reports a batch of `spans` dropped because of `error`.
    pub fn dropped(&mut self, error: &ExportError, spans: u64) {
        let now = Instant::now();
        if self
            .last
            .is_some_and(|at| now.saturating_duration_since(at) < WARN_INTERVAL)
        {
            self.suppressed = self.suppressed.saturating_add(1);
            return;
        }
        tracing::warn!(
            %error,
            spans,
            suppressed_since_last = self.suppressed,
            "span export failed; spans dropped"
        );
        self.last = Some(now);
        self.suppressed = 0;
    }
}

/// What every export request repeats: the resource and the instrumentation scope, encoded
/// once when the exporter starts.
pub struct Envelope {
    /// A `Resource` message.
    resource: Vec<u8>,
    /// `ResourceSpans.schema_url`.
    schema_url: String,
    /// An `InstrumentationScope` message.
    scope: Vec<u8>,
}

impl Envelope {
    /// The envelope of spans from `scope` under `resource`.
    pub fn new(resource: &ResourceAttributesWithSchema, scope: &InstrumentationScope) -> Self {
        let resource_message = Resource {
            attributes: resource.attributes.0.clone(),
            dropped_attributes_count: 0,
            entity_refs: vec![],
        };
        let scope_message = ScopeMessage::from((scope, None));
        Self {
            resource: resource_message.encode_to_vec(),
            schema_url: resource.schema_url.clone().unwrap_or_default(),
            scope: scope_message.encode_to_vec(),
        }
    }
}

/// Encodes the spans of `batch` as one `ExportTraceServiceRequest`: one `ResourceSpans` with
/// one `ScopeSpans`, written directly (see [`RequestSpan::encode`]). The spans are written
/// once, in place: room is left before them for the enclosing messages' keys and lengths,
/// which are known only after, and the message starts where its head ends up.
pub fn encode(batch: &[RequestSpan], envelope: &Envelope) -> Bytes {
    // Keys and lengths of three nested fields (a key and a varint length of at most 10
    // bytes each), the resource and the scope.
    let room =
        3 * 11 + pb::bytes_len(1, envelope.resource.len()) + pb::bytes_len(1, envelope.scope.len());
    // About 900 bytes per request's spans; a guess, the vector grows if short.
    let mut out = Vec::with_capacity(room + batch.len() * 1024 + envelope.schema_url.len() + 16);
    out.resize(room, 0);
    for request in batch {
        request.encode(&mut out);
    }
    let spans_len = out.len() - room;
    // ScopeSpans { scope = 1, spans = 2 (each already framed), schema_url = 3 (none) }
    let scope_spans_len = pb::bytes_len(1, envelope.scope.len()) + spans_len;
    // ResourceSpans { resource = 1, scope_spans = 2, schema_url = 3 }
    let mut resource_spans_len =
        pb::bytes_len(1, envelope.resource.len()) + pb::bytes_len(2, scope_spans_len);
    if !envelope.schema_url.is_empty() {
        resource_spans_len += pb::bytes_len(3, envelope.schema_url.len());
        pb::bytes(&mut out, 3, envelope.schema_url.as_bytes());
    }
    // ExportTraceServiceRequest { resource_spans = 1 }
    let mut head = Vec::with_capacity(room);
    pb::header(&mut head, 1, resource_spans_len);
    pb::bytes(&mut head, 1, &envelope.resource);
    pb::header(&mut head, 2, scope_spans_len);
    pb::bytes(&mut head, 1, &envelope.scope);
    let start = room - head.len();
    out[start..room].copy_from_slice(&head);
    Bytes::from(out).slice(start..)
}

/// A kept connection to the collector.
enum Connection {
    Http1(http1::SendRequest<Full<Bytes>>),
    Http2(http2::SendRequest<Full<Bytes>>),
}

/// The collector's client: where, how, and the connection kept between exports.
pub struct Collector {
    protocol: OtlpProtocol,
    /// Absolute URI of the export (the traces path for HTTP, the gRPC method for gRPC).
    uri: Uri,
    host: String,
    port: u16,
    tls: Option<(tokio_rustls::TlsConnector, ServerName<'static>)>,
    timeout: Duration,
    connection: Option<Connection>,
}

impl Collector {
    /// A client for `otlp`; `https://` endpoints are verified against `ca_file`, or the
    /// system's trust roots without it.
    pub fn new(otlp: &Otlp, ca_file: Option<&Path>, timeout: Duration) -> Result<Self, SetupError> {
        let bad = || SetupError::Endpoint(otlp.endpoint.clone());
        let target = match otlp.protocol {
            OtlpProtocol::Http => http_traces_url(&otlp.endpoint),
            OtlpProtocol::Grpc => {
                let base: Uri = otlp.endpoint.parse().map_err(|_| bad())?;
                let authority = base.authority().ok_or_else(bad)?;
                format!(
                    "{}://{authority}{GRPC_PATH}",
                    base.scheme_str().unwrap_or("http")
                )
            }
        };
        let uri: Uri = target.parse().map_err(|_| bad())?;
        let secure = match uri.scheme_str() {
            Some("http") => false,
            Some("https") => true,
            _ => return Err(bad()),
        };
        let authority = uri.authority().ok_or_else(bad)?;
        let host = authority.host().trim_matches(['[', ']']).to_string();
        if host.is_empty() {
            return Err(bad());
        }
        let port = authority
            .port_u16()
            .unwrap_or(if secure { 443 } else { 80 });
        let tls = if secure {
            let config = tls_config(ca_file, otlp.protocol)?;
            let name = ServerName::try_from(host.clone())
                .map_err(|_| SetupError::ServerName(host.clone()))?;
            Some((tokio_rustls::TlsConnector::from(Arc::new(config)), name))
        } else {
            None
        };
        Ok(Self {
            protocol: otlp.protocol,
            uri,
            host,
            port,
            tls,
            timeout,
            connection: None,
        })
    }

    async fn connect(&self) -> Result<Connection, ExportError> {
        let authority = format!("{}:{}", self.host, self.port);
        let tcp = TcpStream::connect((self.host.as_str(), self.port))
            .await
            .map_err(|source| ExportError::Connect {
                authority: authority.clone(),
                source,
            })?;
        let _ = tcp.set_nodelay(true);
        match &self.tls {
            None => self.handshake(tcp).await,
            Some((connector, name)) => {
                let tls = connector
                    .connect(name.clone(), tcp)
                    .await
                    .map_err(|source| ExportError::Tls { authority, source })?;
                self.handshake(tls).await
            }
        }
    }

    async fn handshake<I>(&self, io: I) -> Result<Connection, ExportError>
    where
        I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let io = TokioIo::new(io);
        match self.protocol {
            OtlpProtocol::Http => {
                let (sender, connection) = http1::handshake(io).await?;
                tokio::spawn(async move {
                    if let Err(error) = connection.await {
                        tracing::debug!(%error, "collector connection ended");
                    }
                });
                Ok(Connection::Http1(sender))
            }
            OtlpProtocol::Grpc => {
                let (sender, connection) = http2::handshake(TokioExecutor::new(), io).await?;
                tokio::spawn(async move {
                    if let Err(error) = connection.await {
                        tracing::debug!(%error, "collector connection ended");
                    }
                });
                Ok(Connection::Http2(sender))
            }
        }
    }

    async fn try_once(&mut self, batch: &Bytes) -> Result<(), ExportError> {
        let reusable = match &self.connection {
            Some(Connection::Http1(sender)) => !sender.is_closed(),
            Some(Connection::Http2(sender)) => !sender.is_closed(),
            None => false,
        };
        let connection = match self.connection.take() {
            Some(connection) if reusable => connection,
            _ => tokio::time::timeout(CONNECT_TIMEOUT, self.connect())
                .await
                .map_err(|_| {
                    ExportError::ConnectTimeout(format!("{}:{}", self.host, self.port))
                })??,
        };
        let (connection, response) = match connection {
            Connection::Http1(mut sender) => {
                sender.ready().await?;
                let mut request = Request::new(Full::new(batch.clone()));
                *request.method_mut() = Method::POST;
                *request.uri_mut() = self
                    .uri
                    .path_and_query()
                    .map_or_else(|| Uri::from_static("/"), |p| Uri::from(p.clone()));
                let headers = request.headers_mut();
                if let Some(authority) = self.uri.authority() {
                    if let Ok(value) = HeaderValue::from_str(authority.as_str()) {
                        headers.insert(HOST, value);
                    }
                }
                headers.insert(
                    CONTENT_TYPE,
                    HeaderValue::from_static("application/x-protobuf"),
                );
                let response = sender.send_request(request).await?;
                (Connection::Http1(sender), response)
            }
            Connection::Http2(mut sender) => {
                sender.ready().await?;
                let mut framed = BytesMut::with_capacity(5 + batch.len());
                framed.put_u8(0);
                framed.put_u32(u32::try_from(batch.len()).unwrap_or(u32::MAX));
                framed.put_slice(batch);
                let mut request = Request::new(Full::new(framed.freeze()));
                *request.method_mut() = Method::POST;
                *request.uri_mut() = self.uri.clone();
                let headers = request.headers_mut();
                headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/grpc"));
                headers.insert("te", HeaderValue::from_static("trailers"));
                let response = sender.send_request(request).await?;
                (Connection::Http2(sender), response)
            }
        };
        let (head, body) = response.into_parts();
        // The body is read whole (bounded) so the connection can carry the next export.
        let collected = Limited::new(body, ANSWER_LIMIT)
            .collect()
            .await
            .map_err(|_| ExportError::Malformed("answer body too long or cut short"))?;
        self.connection = Some(connection);
        match self.protocol {
            OtlpProtocol::Http if head.status.is_success() => Ok(()),
            OtlpProtocol::Http | OtlpProtocol::Grpc if head.status != StatusCode::OK => {
                Err(ExportError::HttpStatus {
                    status: head.status,
                    retry_after: crate::policy::retry::retry_after(&head.headers),
                })
            }
            OtlpProtocol::Http => Ok(()),
            OtlpProtocol::Grpc => {
                // A trailers-only answer carries the status in its headers.
                let trailers = collected.trailers();
                let status = trailers
                    .filter(|t| t.contains_key("grpc-status"))
                    .unwrap_or(&head.headers);
                grpc_result(status)
            }
        }
    }
}

impl Transport for Collector {
    fn send(&mut self, batch: &Bytes) -> impl Future<Output = Result<(), ExportError>> + Send {
        let timeout = self.timeout;
        async move {
            tokio::time::timeout(timeout, self.try_once(batch))
                .await
                .unwrap_or(Err(ExportError::Timeout(timeout)))
                .inspect_err(|_| self.connection = None)
        }
    }
}

/// The outcome of a gRPC call from its status headers or trailers.
fn grpc_result(status: &HeaderMap) -> Result<(), ExportError> {
    let code = status
        .get("grpc-status")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u32>().ok())
        .ok_or(ExportError::Malformed("no grpc-status"))?;
    if code == 0 {
        return Ok(());
    }
    Err(ExportError::GrpcStatus {
        code,
        message: status
            .get("grpc-message")
            .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
            .unwrap_or_default(),
        retry_info: status
            .get("grpc-status-details-bin")
            .and_then(|v| retry_info(v.as_bytes())),
    })
}

/// `google.rpc.Status`, as far as the retry delay needs it.
#[derive(Clone, PartialEq, prost::Message)]
struct RpcStatus {
    #[prost(int32, tag = "1")]
    code: i32,
    #[prost(string, tag = "2")]
    message: String,
    #[prost(message, repeated, tag = "3")]
    details: Vec<ProtoAny>,
}

/// `google.protobuf.Any`.
#[derive(Clone, PartialEq, prost::Message)]
struct ProtoAny {
    #[prost(string, tag = "1")]
    type_url: String,
    #[prost(bytes = "vec", tag = "2")]
    value: Vec<u8>,
}

/// `google.rpc.RetryInfo`.
#[derive(Clone, PartialEq, prost::Message)]
struct RetryInfo {
    #[prost(message, optional, tag = "1")]
    retry_delay: Option<ProtoDuration>,
}

/// `google.protobuf.Duration`.
#[derive(Clone, PartialEq, prost::Message)]
struct ProtoDuration {
    #[prost(int64, tag = "1")]
    seconds: i64,
    #[prost(int32, tag = "2")]
    nanos: i32,
}

const RETRY_INFO_TYPE: &str = "type.googleapis.com/google.rpc.RetryInfo";

/// The delay of the `RetryInfo` in a `grpc-status-details-bin` value (base64, padded or not).
fn retry_info(details_bin: &[u8]) -> Option<Duration> {
    use base64::engine::{general_purpose, DecodePaddingMode, GeneralPurpose};
    use base64::Engine as _;
    const LENIENT: GeneralPurpose = GeneralPurpose::new(
        &base64::alphabet::STANDARD,
        general_purpose::NO_PAD.with_decode_padding_mode(DecodePaddingMode::Indifferent),
    );
    let status = RpcStatus::decode(LENIENT.decode(details_bin).ok()?.as_slice()).ok()?;
    let detail = status
        .details
        .iter()
        .find(|d| d.type_url == RETRY_INFO_TYPE)?;
    let delay = RetryInfo::decode(detail.value.as_slice())
        .ok()?
        .retry_delay?;
    let seconds = u64::try_from(delay.seconds).ok()?;
    let nanos = u32::try_from(delay.nanos).ok()?;
    Some(Duration::from_secs(seconds).saturating_add(Duration::from_nanos(u64::from(nanos))))
}

/// TLS to the collector: TLS 1.3 or 1.2, ALPN for the protocol, verified against `ca_file` or
/// the system's trust roots (rustls-native-certs: the store the image's operator manages, e.g.
/// with update-ca-certificates, so an in-cluster collector's private CA works without a flag).
fn tls_config(ca_file: Option<&Path>, protocol: OtlpProtocol) -> Result<ClientConfig, SetupError> {
    let mut roots = RootCertStore::empty();
    match ca_file {
        Some(path) => {
            let pem = std::fs::read(path).map_err(|source| SetupError::ReadCa {
                path: path.display().to_string(),
                source,
            })?;
            let certs = CertificateDer::pem_slice_iter(&pem).filter_map(Result::ok);
            roots.add_parsable_certificates(certs);
            if roots.is_empty() {
                return Err(SetupError::NoRoots(format!(
                    "no certificate in {}",
                    path.display()
                )));
            }
        }
        None => {
            let found = rustls_native_certs::load_native_certs();
            roots.add_parsable_certificates(found.certs);
            if roots.is_empty() {
                return Err(SetupError::NoRoots(
                    "the system store is empty; pass --otlp-ca-file".into(),
                ));
            }
        }
    }
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut config = ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = match protocol {
        OtlpProtocol::Grpc => vec![b"h2".to_vec()],
        OtlpProtocol::Http => vec![b"http/1.1".to_vec()],
    };
    Ok(config)
}

/// OTLP/HTTP posts to `/v1/traces`; an endpoint given without a path gets it appended.
fn http_traces_url(endpoint: &str) -> String {
    let after_scheme = endpoint
        .split_once("://")
        .map_or(endpoint, |(_, rest)| rest);
    match after_scheme.find('/') {
        None => format!("{endpoint}/v1/traces"),
        Some(i) if after_scheme[i..] == *"/" => format!("{}v1/traces", endpoint),
        Some(_) => endpoint.to_string(),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use std::collections::VecDeque;

    use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
    use opentelemetry_proto::transform::trace::tonic::group_spans_by_resource_and_scope;
    use opentelemetry_sdk::trace::SpanData;

    use crate::telemetry::span::tests::corpus;

    #[test]
    fn a_batch_decodes_as_the_sdk_conversion_built_it() {
        let resource = opentelemetry_sdk::Resource::builder()
            .with_service_name("shop")
            .build();
        let resource = ResourceAttributesWithSchema::from(&resource);
        let scope = InstrumentationScope::builder("outrider-proxy")
            .with_version("1.2.3")
            .build();
        let corpus = corpus();
        // One request at a time, then all in one batch.
        let mut batches: Vec<&[RequestSpan]> = corpus.chunks(1).collect();
        batches.push(&corpus);
        for batch in batches {
            let reference: Vec<SpanData> = batch
                .iter()
                .flat_map(|span| span.reference_build(&span.attempt_spans, &scope))
                .collect();
            let expected = ExportTraceServiceRequest {
                resource_spans: group_spans_by_resource_and_scope(reference, &resource),
            };
            let encoded = encode(batch, &Envelope::new(&resource, &scope));
            let decoded = ExportTraceServiceRequest::decode(encoded).expect("valid protobuf");
            assert_eq!(decoded, expected, "{batch:?}");
        }
    }

    #[test]
    fn http_endpoint_gets_the_traces_path() {
        assert_eq!(http_traces_url("http://c:4318"), "http://c:4318/v1/traces");
        assert_eq!(http_traces_url("http://c:4318/"), "http://c:4318/v1/traces");
        assert_eq!(
            http_traces_url("http://c:4318/custom"),
            "http://c:4318/custom"
        );
    }

    /// Answers each try with the next scripted result and records when it was tried.
    struct Scripted {
        answers: VecDeque<Result<(), ExportError>>,
        tried_at: Vec<Instant>,
    }

    impl Transport for Scripted {
        fn send(&mut self, _: &Bytes) -> impl Future<Output = Result<(), ExportError>> + Send {
            self.tried_at.push(Instant::now());
            let answer = self.answers.pop_front().unwrap_or(Ok(()));
            async move { answer }
        }
    }

    fn unavailable(retry_info: Option<Duration>) -> Result<(), ExportError> {
        Err(ExportError::GrpcStatus {
            code: 14,
            message: String::new(),
            retry_info,
        })
    }

    fn scripted(answers: Vec<Result<(), ExportError>>) -> Scripted {
        Scripted {
            answers: answers.into(),
            tried_at: Vec::new(),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn retryable_failures_back_off_exponentially_with_jitter() {
        let (_stop_tx, mut stop) = watch::channel(false);
        let mut transport = scripted(vec![
            unavailable(None),
            unavailable(None),
            unavailable(None),
        ]);
        let started = Instant::now();
        deliver(&mut transport, &Bytes::new(), &mut stop)
            .await
            .unwrap();
        let gaps: Vec<Duration> = transport.tried_at.windows(2).map(|w| w[1] - w[0]).collect();
        assert_eq!(gaps.len(), 3);
        // Equal jitter: retry n waits between half the ceiling and the ceiling, 0.5 s doubling.
        for (gap, ceiling) in gaps.iter().zip([500u64, 1000, 2000]) {
            let ceiling = Duration::from_millis(ceiling);
            assert!(
                *gap >= ceiling / 2 && *gap <= ceiling,
                "{gap:?} vs {ceiling:?}"
            );
        }
        assert!(started.elapsed() <= Duration::from_millis(3500));
    }

    #[tokio::test(start_paused = true)]
    async fn the_collectors_delay_is_honoured_up_to_the_cap() {
        let (_stop_tx, mut stop) = watch::channel(false);
        let asked = Err(ExportError::HttpStatus {
            status: StatusCode::TOO_MANY_REQUESTS,
            retry_after: Some(Duration::from_secs(7)),
        });
        let mut transport = scripted(vec![asked, unavailable(Some(Duration::from_secs(3600)))]);
        deliver(&mut transport, &Bytes::new(), &mut stop)
            .await
            .unwrap();
        let t = &transport.tried_at;
        assert_eq!(t[1] - t[0], Duration::from_secs(7));
        assert_eq!(t[2] - t[1], RETRY_MAX_DELAY);
    }

    #[tokio::test(start_paused = true)]
    async fn a_batch_is_given_up_after_the_last_try_or_at_once_when_not_retryable() {
        let (stop_tx, mut stop) = watch::channel(false);
        let mut transport = scripted((0..10).map(|_| unavailable(None)).collect());
        assert!(deliver(&mut transport, &Bytes::new(), &mut stop)
            .await
            .is_err());
        assert_eq!(transport.tried_at.len(), MAX_ATTEMPTS as usize);

        let invalid = Err(ExportError::GrpcStatus {
            code: 3,
            message: "bad".into(),
            retry_info: None,
        });
        let mut transport = scripted(vec![invalid]);
        assert!(deliver(&mut transport, &Bytes::new(), &mut stop)
            .await
            .is_err());
        assert_eq!(transport.tried_at.len(), 1);

        // RESOURCE_EXHAUSTED is retried only with the collector's RetryInfo.
        let exhausted = |retry_info| ExportError::GrpcStatus {
            code: 8,
            message: String::new(),
            retry_info,
        };
        assert_eq!(exhausted(None).verdict(), Verdict::Drop);
        let delay = Some(Duration::from_secs(1));
        assert_eq!(exhausted(delay).verdict(), Verdict::Retry(delay));

        // Shutdown: no more waiting, one more immediate try.
        stop_tx.send(true).unwrap();
        let mut transport = scripted((0..10).map(|_| unavailable(None)).collect());
        let started = Instant::now();
        assert!(deliver(&mut transport, &Bytes::new(), &mut stop)
            .await
            .is_err());
        assert_eq!(transport.tried_at.len(), 1);
        assert_eq!(started.elapsed(), Duration::ZERO);
    }

    #[test]
    fn retry_info_is_read_from_the_status_details() {
        use base64::Engine as _;
        let info = RetryInfo {
            retry_delay: Some(ProtoDuration {
                seconds: 2,
                nanos: 500_000_000,
            }),
        };
        let status = RpcStatus {
            code: 14,
            message: "busy".into(),
            details: vec![ProtoAny {
                type_url: RETRY_INFO_TYPE.into(),
                value: info.encode_to_vec(),
            }],
        };
        let bytes = status.encode_to_vec();
        for engine in [
            base64::engine::general_purpose::STANDARD,
            base64::engine::general_purpose::STANDARD_NO_PAD,
        ] {
            assert_eq!(
                retry_info(engine.encode(&bytes).as_bytes()),
                Some(Duration::from_millis(2500))
            );
        }
        assert_eq!(retry_info(b"not base64!"), None);
    }
}
