//! App health probes forwarded by the admin port: `GET /app-health/<container>/<kind>`.
//!
//! With capture, the kubelet's plaintext probes against the app's ports would land on the
//! inbound port and be refused under `mtls: strict`. `outriderctl inject` therefore points them
//! at the admin port (which the capture rules leave alone) and hands the original probes to the
//! proxy (`--app-probes`, JSON keyed by `<container>/<liveness|readiness|startup>`). The proxy
//! performs each one against the app itself, from its own uid (whose connections are not
//! captured), and answers 200 or 503 as the kubelet would judge the original.
//!
//! A probe names only a port: the address is the pod's own (`--pod-ip`, else loopback), so the
//! admin port cannot be made to connect anywhere else.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use bytes::{Buf, Bytes};
use http::header::{HeaderName, HeaderValue, CONTENT_TYPE, HOST, USER_AGENT};
use http::uri::PathAndQuery;
use http::{HeaderMap, Method, Request};
use http_body_util::{BodyExt, Empty, Full, Limited};
use hyper_util::rt::{TokioExecutor, TokioIo};
use outrider_config::app_probe::{ProbeRecord, MAX_TIMEOUT_SECONDS};
use rustls::pki_types::ServerName;
use tokio::net::TcpStream;

/// Where the admin port serves the forwarded probes.
pub const PATH_PREFIX: &str = "/app-health/";
/// Most probes one proxy accepts: three kinds for each of a pod's containers.
const MAX_PROBES: usize = 192;
/// Longest gRPC health response read: the message is a few bytes.
const GRPC_RESPONSE_LIMIT: usize = 4096;
/// `grpc.health.v1.HealthCheckResponse.ServingStatus.SERVING`.
const GRPC_SERVING: u64 = 1;

/// Why `--app-probes` was refused.
#[derive(Debug, thiserror::Error)]
pub enum AppProbeError {
    /// Not the JSON shape inject writes.
    #[error("--app-probes: {0}")]
    Json(#[from] serde_json::Error),
    /// A `--pod-ip` no connection can be made to.
    #[error("--pod-ip {0} is not a unicast address")]
    BadPodIp(IpAddr),
    /// More probes than a pod can have.
    #[error("--app-probes: {count} probes; at most {MAX_PROBES}")]
    TooMany {
        /// How many were given.
        count: usize,
    },
    /// A key that is not `<container>/<liveness|readiness|startup>`.
    #[error("--app-probes: `{0}` is not <container>/<liveness|readiness|startup>")]
    BadName(String),
    /// A probe that is invalid; `reason` says how.
    #[error("--app-probes: {name}: {reason}")]
    BadProbe {
        /// The probe's key.
        name: String,
        /// What is wrong.
        reason: String,
    },
}

/// How one probe is performed.
#[derive(Debug, Clone)]
enum Action {
    /// HTTP GET; 2xx and 3xx are healthy, as the kubelet counts them.
    Http {
        port: u16,
        https: bool,
        path: PathAndQuery,
        headers: HeaderMap,
    },
    /// A TCP connection that opens is healthy.
    Tcp { port: u16 },
    /// `grpc.health.v1.Health/Check` answering SERVING is healthy.
    Grpc { port: u16, service: String },
}

/// One probe, validated.
#[derive(Debug, Clone)]
struct AppProbe {
    action: Action,
    timeout: Duration,
}

/// Every forwarded probe of this pod, validated once at start.
#[derive(Debug)]
pub struct AppProbes {
    /// The pod's address the probes connect to (never any other host).
    target: IpAddr,
    probes: HashMap<String, AppProbe>,
    /// For HTTPS probes: certificates are not verified, as the kubelet does not.
    tls: Option<Arc<rustls::ClientConfig>>,
}

/// What a probe found: healthy or not, and a short line saying why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verdict {
    /// Whether the kubelet would count the original probe a success.
    pub healthy: bool,
    /// One line for the response body.
    pub reason: String,
}

impl AppProbes {
    /// Parses `--app-probes` (a JSON object; empty text means none). Probes connect to
    /// `pod_ip`, or to 127.0.0.1 without it.
    pub fn parse(json: &str, pod_ip: Option<IpAddr>) -> Result<Self, AppProbeError> {
        let target = pod_ip.unwrap_or(IpAddr::V4(Ipv4Addr::LOCALHOST));
        if target.is_unspecified() || target.is_multicast() {
            return Err(AppProbeError::BadPodIp(target));
        }
        if json.trim().is_empty() {
            return Ok(Self::none(target));
        }
        let records: HashMap<String, ProbeRecord> = serde_json::from_str(json)?;
        if records.len() > MAX_PROBES {
            return Err(AppProbeError::TooMany {
                count: records.len(),
            });
        }
        let mut probes = HashMap::with_capacity(records.len());
        let mut any_https = false;
        for (name, record) in records {
            check_name(&name)?;
            let probe = validate(&name, record)?;
            any_https |= matches!(probe.action, Action::Http { https: true, .. });
            probes.insert(name, probe);
        }
        Ok(Self {
            target,
            probes,
            tls: any_https
                .then(crate::io::identity::unverified_client_config)
                .flatten(),
        })
    }

    /// No probes (`/app-health/...` answers 404).
    pub fn none(target: IpAddr) -> Self {
        Self {
            target,
            probes: HashMap::new(),
            tls: None,
        }
    }

    /// How many probes are configured.
    pub fn len(&self) -> usize {
        self.probes.len()
    }

    /// Whether none are.
    pub fn is_empty(&self) -> bool {
        self.probes.is_empty()
    }

    /// Performs the probe named `name` (`<container>/<kind>`); `None` if there is none.
    pub async fn check(&self, name: &str) -> Option<Verdict> {
        let probe = self.probes.get(name)?;
        let outcome = tokio::time::timeout(probe.timeout, self.perform(self.target, probe)).await;
        Some(match outcome {
            Ok(Ok(reason)) => Verdict {
                healthy: true,
                reason,
            },
            Ok(Err(reason)) => Verdict {
                healthy: false,
                reason,
            },
            Err(_) => Verdict {
                healthy: false,
                reason: format!("no answer within the probe's timeout ({:?})", probe.timeout),
            },
        })
    }

    /// Healthy: `Ok(what was seen)`; else `Err(why)`.
    async fn perform(&self, target: IpAddr, probe: &AppProbe) -> Result<String, String> {
        match &probe.action {
            Action::Tcp { port } => {
                let addr = SocketAddr::new(target, *port);
                connect(addr).await?;
                Ok(format!("tcp {addr} connected"))
            }
            Action::Http {
                port,
                https,
                path,
                headers,
            } => {
                let addr = SocketAddr::new(target, *port);
                let stream = connect(addr).await?;
                let request = http_request(addr, path, headers)?;
                let status = match (https, &self.tls) {
                    (true, Some(tls)) => {
                        let connector = tokio_rustls::TlsConnector::from(Arc::clone(tls));
                        let name = ServerName::IpAddress(target.into());
                        let stream = connector
                            .connect(name, stream)
                            .await
                            .map_err(|e| format!("TLS handshake with {addr}: {e}"))?;
                        http1_status(stream, request).await?
                    }
                    (true, None) => return Err("no TLS client for HTTPS probes".to_string()),
                    (false, _) => http1_status(stream, request).await?,
                };
                let scheme = if *https { "https" } else { "http" };
                let line = format!("{scheme} {addr}{path}: HTTP {}", status.as_u16());
                // As the kubelet counts: 200-399.
                if (200..400).contains(&status.as_u16()) {
                    Ok(line)
                } else {
                    Err(line)
                }
            }
            Action::Grpc { port, service } => {
                let addr = SocketAddr::new(target, *port);
                let stream = connect(addr).await?;
                grpc_health(addr, stream, service).await
            }
        }
    }
}

fn check_name(name: &str) -> Result<(), AppProbeError> {
    let bad = || AppProbeError::BadName(name.chars().take(80).collect());
    let (container, kind) = name.split_once('/').ok_or_else(bad)?;
    let label_ok = !container.is_empty()
        && container.len() <= 63
        && container
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
    if !label_ok || !matches!(kind, "liveness" | "readiness" | "startup") {
        return Err(bad());
    }
    Ok(())
}

fn validate(name: &str, record: ProbeRecord) -> Result<AppProbe, AppProbeError> {
    let bad = |reason: String| AppProbeError::BadProbe {
        name: name.to_string(),
        reason,
    };
    if record.timeout_seconds == 0 || record.timeout_seconds > MAX_TIMEOUT_SECONDS {
        return Err(bad(format!(
            "timeoutSeconds {} is not 1-{MAX_TIMEOUT_SECONDS}",
            record.timeout_seconds
        )));
    }
    let port_ok = |port: u16| {
        if port == 0 {
            Err(bad("port 0 is not a port".to_string()))
        } else {
            Ok(port)
        }
    };
    let action = match (record.http_get, record.tcp_socket, record.grpc) {
        (Some(get), None, None) => {
            let https = match get.scheme.as_deref() {
                None | Some("HTTP") => false,
                Some("HTTPS") => true,
                Some(other) => return Err(bad(format!("scheme `{other}` is not HTTP or HTTPS"))),
            };
            let path = get.path.unwrap_or_else(|| "/".to_string());
            if !path.starts_with('/') {
                return Err(bad(format!("path `{path}` does not start with /")));
            }
            let path: PathAndQuery = path
                .parse()
                .map_err(|_| bad(format!("path `{path}` is not a valid request target")))?;
            let mut headers = HeaderMap::new();
            for header in get.http_headers {
                let header_name = HeaderName::from_bytes(header.name.as_bytes())
                    .map_err(|_| bad(format!("`{}` is not a header name", header.name)))?;
                let value = HeaderValue::from_str(&header.value)
                    .map_err(|_| bad(format!("header {header_name} has a bad value")))?;
                headers.append(header_name, value);
            }
            Action::Http {
                port: port_ok(get.port)?,
                https,
                path,
                headers,
            }
        }
        (None, Some(tcp), None) => Action::Tcp {
            port: port_ok(tcp.port)?,
        },
        (None, None, Some(grpc)) => Action::Grpc {
            port: port_ok(grpc.port)?,
            service: grpc.service.unwrap_or_default(),
        },
        _ => {
            return Err(bad(
                "exactly one of httpGet, tcpSocket and grpc is needed".to_string()
            ))
        }
    };
    Ok(AppProbe {
        action,
        timeout: Duration::from_secs(u64::from(record.timeout_seconds)),
    })
}

async fn connect(addr: SocketAddr) -> Result<TcpStream, String> {
    let stream = TcpStream::connect(addr)
        .await
        .map_err(|e| format!("tcp {addr}: {e}"))?;
    let _ = stream.set_nodelay(true);
    Ok(stream)
}

/// The kubelet's request: its Host (the pod's address) and User-Agent unless the probe sets
/// them, then the probe's own headers.
fn http_request(
    addr: SocketAddr,
    path: &PathAndQuery,
    headers: &HeaderMap,
) -> Result<Request<Empty<Bytes>>, String> {
    let mut request = Request::new(Empty::new());
    *request.method_mut() = Method::GET;
    *request.uri_mut() = path
        .as_str()
        .parse()
        .map_err(|_| format!("bad path {path}"))?;
    let defaults = request.headers_mut();
    if let Ok(host) = HeaderValue::from_str(&addr.to_string()) {
        defaults.insert(HOST, host);
    }
    defaults.insert(USER_AGENT, HeaderValue::from_static("kube-probe/outrider"));
    defaults.insert(http::header::ACCEPT, HeaderValue::from_static("*/*"));
    for name in headers.keys() {
        defaults.remove(name);
    }
    for (name, value) in headers {
        defaults.append(name, value.clone());
    }
    Ok(request)
}

/// One HTTP/1.1 GET on `io`: the response status (the body is not read; the connection is
/// dropped after the head).
async fn http1_status<T>(io: T, request: Request<Empty<Bytes>>) -> Result<http::StatusCode, String>
where
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(io))
        .await
        .map_err(|e| format!("HTTP handshake: {e}"))?;
    tokio::pin!(connection);
    // The connection is driven here, not spawned: it ends with this probe (and its deadline).
    tokio::select! {
        biased;
        response = sender.send_request(request) => response
            .map(|r| r.status())
            .map_err(|e| format!("HTTP request: {e}")),
        closed = &mut connection => Err(match closed {
            Ok(()) => "connection closed before a response".to_string(),
            Err(e) => format!("HTTP: {e}"),
        }),
    }
}

/// `grpc.health.v1.Health/Check` for `service` over h2c (the kubelet's gRPC probes are
/// plaintext): SERVING is healthy.
async fn grpc_health(addr: SocketAddr, io: TcpStream, service: &str) -> Result<String, String> {
    let (mut sender, connection) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(io))
            .await
            .map_err(|e| format!("h2c {addr}: {e}"))?;
    let request = Request::builder()
        .method(Method::POST)
        .uri(format!("http://{addr}/grpc.health.v1.Health/Check"))
        .header(CONTENT_TYPE, "application/grpc")
        .header("te", "trailers")
        .header(USER_AGENT, "kube-probe/outrider")
        .body(Full::new(health_check_request(service)))
        .map_err(|e| format!("gRPC request: {e}"))?;
    let exchange = async {
        let response = sender
            .send_request(request)
            .await
            .map_err(|e| format!("gRPC {addr}: {e}"))?;
        let (head, body) = response.into_parts();
        if head.status != http::StatusCode::OK {
            return Err(format!("gRPC {addr}: HTTP {}", head.status.as_u16()));
        }
        let collected = Limited::new(body, GRPC_RESPONSE_LIMIT)
            .collect()
            .await
            .map_err(|e| format!("gRPC {addr}: {e}"))?;
        // Trailers, or headers alone for a trailers-only answer.
        let trailers = collected.trailers().cloned().unwrap_or_default();
        let status = trailers
            .get("grpc-status")
            .or_else(|| head.headers.get("grpc-status"))
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_string();
        Ok::<_, String>((status, collected.to_bytes()))
    };
    tokio::pin!(connection);
    let (status, body) = tokio::select! {
        biased;
        done = exchange => done?,
        closed = &mut connection => return Err(match closed {
            Ok(()) => format!("gRPC {addr}: connection closed before a response"),
            Err(e) => format!("gRPC {addr}: {e}"),
        }),
    };
    if status != "0" {
        return Err(format!("gRPC {addr}: grpc-status {status:?}"));
    }
    match serving_status(body) {
        Some(GRPC_SERVING) => Ok(format!("gRPC {addr}: SERVING")),
        Some(other) => Err(format!("gRPC {addr}: serving status {other}, not SERVING")),
        None => Err(format!("gRPC {addr}: malformed health response")),
    }
}

/// A length-prefixed `HealthCheckRequest { string service = 1; }`.
fn health_check_request(service: &str) -> Bytes {
    let mut message = Vec::with_capacity(service.len() + 8);
    if !service.is_empty() {
        message.push(0x0a);
        put_varint(&mut message, service.len() as u64);
        message.extend_from_slice(service.as_bytes());
    }
    let mut framed = Vec::with_capacity(message.len() + 5);
    framed.push(0);
    // Capped by the name's length (a Kubernetes string), far below u32::MAX.
    framed.extend_from_slice(
        &u32::try_from(message.len())
            .unwrap_or(u32::MAX)
            .to_be_bytes(),
    );
    framed.extend_from_slice(&message);
    Bytes::from(framed)
}

fn put_varint(out: &mut Vec<u8>, mut value: u64) {
    while value >= 0x80 {
        out.push((value as u8) | 0x80);
        value >>= 7;
    }
    out.push(value as u8);
}

fn get_varint(buf: &mut Bytes) -> Option<u64> {
    let mut value = 0u64;
    for shift in (0..64).step_by(7) {
        if !buf.has_remaining() {
            return None;
        }
        let byte = buf.get_u8();
        value |= u64::from(byte & 0x7f) << shift;
        if byte & 0x80 == 0 {
            return Some(value);
        }
    }
    None
}

/// The `status` (field 1) of the one `HealthCheckResponse` in a gRPC body; unknown fields are
/// skipped, an absent status is UNKNOWN (0).
fn serving_status(mut body: Bytes) -> Option<u64> {
    if body.remaining() < 5 || body.get_u8() != 0 {
        return None;
    }
    let length = usize::try_from(body.get_u32()).ok()?;
    if body.remaining() < length {
        return None;
    }
    let mut message = body.split_to(length);
    let mut status = 0;
    while message.has_remaining() {
        let key = get_varint(&mut message)?;
        match (key >> 3, key & 7) {
            (1, 0) => status = get_varint(&mut message)?,
            (_, 0) => {
                get_varint(&mut message)?;
            }
            (_, 2) => {
                let skip = usize::try_from(get_varint(&mut message)?).ok()?;
                if message.remaining() < skip {
                    return None;
                }
                message.advance(skip);
            }
            (_, 1) if message.remaining() >= 8 => message.advance(8),
            (_, 5) if message.remaining() >= 4 => message.advance(4),
            _ => return None,
        }
    }
    Some(status)
}

/// The body of a `/app-health/...` answer.
pub fn body(verdict: &Verdict) -> String {
    let mut body = String::with_capacity(verdict.reason.len() + 16);
    let _ = writeln!(
        body,
        "{}: {}",
        if verdict.healthy {
            "healthy"
        } else {
            "unhealthy"
        },
        verdict.reason
    );
    body
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn parse(json: &str) -> Result<AppProbes, AppProbeError> {
        AppProbes::parse(json, None)
    }

    #[test]
    fn what_inject_writes_is_accepted() {
        let probes = parse(
            r#"{"app/liveness":{"httpGet":{"path":"/healthz?full=1","port":8080,"scheme":"HTTPS",
                "httpHeaders":[{"name":"X-Probe","value":"1"}]},"timeoutSeconds":3},
               "app/readiness":{"tcpSocket":{"port":8080},"timeoutSeconds":1},
               "side-car2/startup":{"grpc":{"port":9090,"service":"shop"},"timeoutSeconds":1}}"#,
        )
        .unwrap();
        assert_eq!(probes.len(), 3);
        assert!(probes.tls.is_some(), "an HTTPS probe gets a TLS client");
        let liveness = &probes.probes["app/liveness"];
        assert_eq!(liveness.timeout, Duration::from_secs(3));
        let Action::Http {
            port,
            https,
            path,
            headers,
        } = &liveness.action
        else {
            panic!("{liveness:?}");
        };
        assert_eq!(
            (*port, *https, path.as_str()),
            (8080, true, "/healthz?full=1")
        );
        assert_eq!(headers["x-probe"], "1");
        assert!(parse("").unwrap().is_empty());
        assert_eq!(probes.target, IpAddr::V4(Ipv4Addr::LOCALHOST));
    }

    #[test]
    fn probes_cannot_name_a_host_or_anything_else_unexpected() {
        for (json, reason) in [
            (
                r#"{"app/liveness":{"httpGet":{"host":"169.254.169.254","port":80}}}"#,
                "unknown field `host`",
            ),
            (
                r#"{"app/liveness":{"tcpSocket":{"host":"db","port":5432}}}"#,
                "unknown field `host`",
            ),
            (
                r#"{"app/alive":{"tcpSocket":{"port":1}}}"#,
                "is not <container>/",
            ),
            (
                r#"{"App/liveness":{"tcpSocket":{"port":1}}}"#,
                "is not <container>/",
            ),
            (r#"{"app/liveness":{"tcpSocket":{"port":0}}}"#, "port 0"),
            (r#"{"app/liveness":{"tcpSocket":{"port":65536}}}"#, "65536"),
            (r#"{"app/liveness":{"timeoutSeconds":1}}"#, "exactly one of"),
            (
                r#"{"app/liveness":{"tcpSocket":{"port":1},"grpc":{"port":1}}}"#,
                "exactly one of",
            ),
            (
                r#"{"app/liveness":{"tcpSocket":{"port":1},"timeoutSeconds":0}}"#,
                "timeoutSeconds 0",
            ),
            (
                r#"{"app/liveness":{"httpGet":{"port":1,"path":"healthz"}}}"#,
                "does not start with /",
            ),
            (
                r#"{"app/liveness":{"httpGet":{"port":1,"scheme":"FTP"}}}"#,
                "scheme `FTP`",
            ),
            (
                r#"{"app/liveness":{"httpGet":{"port":1,"httpHeaders":[{"name":"a b","value":"1"}]}}}"#,
                "not a header name",
            ),
            ("[]", "expected a map"),
        ] {
            let error = parse(json).unwrap_err().to_string();
            assert!(error.contains(reason), "{json}: {error}");
        }
        let error = AppProbes::parse("", Some("0.0.0.0".parse().unwrap())).unwrap_err();
        assert_eq!(
            error.to_string(),
            "--pod-ip 0.0.0.0 is not a unicast address"
        );
        let many: Vec<String> = (0..=MAX_PROBES)
            .map(|i| format!(r#""c{i}/liveness":{{"tcpSocket":{{"port":1}}}}"#))
            .collect();
        let error = parse(&format!("{{{}}}", many.join(","))).unwrap_err();
        assert!(
            matches!(error, AppProbeError::TooMany { count: 193 }),
            "{error}"
        );
    }

    #[test]
    fn grpc_health_messages() {
        assert_eq!(&health_check_request("")[..], [0, 0, 0, 0, 0]);
        assert_eq!(
            &health_check_request("shop")[..],
            [0, 0, 0, 0, 6, 0x0a, 4, b's', b'h', b'o', b'p']
        );
        let framed = |message: &[u8]| {
            let mut body = vec![0];
            body.extend_from_slice(&u32::try_from(message.len()).unwrap().to_be_bytes());
            body.extend_from_slice(message);
            Bytes::from(body)
        };
        assert_eq!(serving_status(framed(&[0x08, 1])), Some(GRPC_SERVING));
        assert_eq!(serving_status(framed(&[0x08, 2])), Some(2));
        assert_eq!(serving_status(framed(&[])), Some(0), "absent: UNKNOWN");
        // An unknown length-delimited field first is skipped.
        assert_eq!(
            serving_status(framed(&[0x12, 2, b'h', b'i', 0x08, 1])),
            Some(1)
        );
        assert_eq!(serving_status(framed(&[0x12, 9, b'h'])), None, "truncated");
        assert_eq!(serving_status(Bytes::from_static(&[1, 0, 0, 0, 0])), None);
        assert_eq!(serving_status(Bytes::from_static(&[0, 0, 0])), None);
        let mut varint = Vec::new();
        put_varint(&mut varint, 300);
        assert_eq!(varint, [0xac, 0x02]);
        assert_eq!(get_varint(&mut Bytes::from(varint)), Some(300));
        assert_eq!(get_varint(&mut Bytes::from_static(&[0xff; 11])), None);
    }

    /// An app that accepts the connection (the kernel's backlog does) but never answers fails
    /// when the probe's timeout runs out, on paused time.
    #[tokio::test(start_paused = true)]
    async fn a_silent_app_fails_at_the_probes_timeout() {
        let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = silent.local_addr().unwrap().port();
        let probes = parse(&format!(
            r#"{{"app/liveness":{{"httpGet":{{"port":{port}}},"timeoutSeconds":5}}}}"#
        ))
        .unwrap();
        let started = tokio::time::Instant::now();
        let verdict = probes.check("app/liveness").await.unwrap();
        assert_eq!(started.elapsed(), Duration::from_secs(5));
        assert!(!verdict.healthy);
        assert_eq!(verdict.reason, "no answer within the probe's timeout (5s)");
        assert_eq!(probes.check("app/readiness").await, None);
    }

    /// An HTTPS probe against an app with a self-signed certificate for another name: the
    /// certificate is not verified (as the kubelet does not), the status is what counts.
    #[tokio::test]
    async fn https_probes_skip_certificate_verification() {
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec!["app.example".to_string()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(
                vec![cert.der().clone()],
                rustls::pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into()),
            )
            .unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let server = tokio::spawn(async move {
            let (stream, _) = listener.accept().await.unwrap();
            let tls = acceptor.accept(stream).await.unwrap();
            let service = hyper::service::service_fn(|req: Request<hyper::body::Incoming>| {
                let status = if req.uri().path() == "/healthz" {
                    200
                } else {
                    404
                };
                async move {
                    http::Response::builder()
                        .status(status)
                        .body(Empty::<Bytes>::new())
                }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(tls), service)
                .await;
        });
        let probes = parse(&format!(
            r#"{{"app/readiness":{{"httpGet":{{"port":{port},"path":"/healthz","scheme":"HTTPS"}}}}}}"#
        ))
        .unwrap();
        let verdict = probes.check("app/readiness").await.unwrap();
        assert_eq!(
            verdict,
            Verdict {
                healthy: true,
                reason: format!("https 127.0.0.1:{port}/healthz: HTTP 200"),
            }
        );
        server.await.unwrap();
    }
}
