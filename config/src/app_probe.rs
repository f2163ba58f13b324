//! The app's probes a sidecar performs for the kubelet: `outriderctl inject` points them at the
//! proxy's admin port and records the originals as JSON (`OUTRIDER_APP_PROBES`, keyed by
//! `<container>/<liveness|readiness|startup>`); the proxy reads that (`--app-probes`) and
//! performs each. Plain serde data, written by one and read by the other.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// Longest probe timeout accepted (the kubelet sets no bound; a day is surely a mistake).
pub const MAX_TIMEOUT_SECONDS: u32 = 3600;

/// The app's probes by `<container>/<kind>`: what `--app-probes` holds.
pub type ProbeRecords = BTreeMap<String, ProbeRecord>;

/// One of the app's probes as the proxy performs it: the kubelet's handler (exactly one of
/// `httpGet`, `tcpSocket`, `grpc`) with its port resolved to a number, and its timeout. Also
/// what a later injection restores the probe from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ProbeRecord {
    /// An HTTP GET.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http_get: Option<HttpGetRecord>,
    /// A TCP connect.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tcp_socket: Option<PortRecord>,
    /// A `grpc.health.v1` check.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub grpc: Option<GrpcRecord>,
    /// Seconds the probe may take; the kubelet's default is 1.
    #[serde(default = "one_second")]
    pub timeout_seconds: u32,
}

fn one_second() -> u32 {
    1
}

impl ProbeRecord {
    /// The app's port the probe connects to (0 without a handler).
    pub fn port(&self) -> u16 {
        match (&self.http_get, &self.tcp_socket, &self.grpc) {
            (Some(get), _, _) => get.port,
            (_, Some(tcp), _) => tcp.port,
            (_, _, Some(grpc)) => grpc.port,
            _ => 0,
        }
    }
}

/// An `httpGet` handler.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HttpGetRecord {
    /// Request target; `/` when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    /// The app's port.
    pub port: u16,
    /// `HTTP` (when absent) or `HTTPS`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scheme: Option<String>,
    /// Header fields sent with the request.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub http_headers: Vec<HeaderRecord>,
}

/// One header field of an `httpGet` probe.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HeaderRecord {
    /// Field name.
    pub name: String,
    /// Field value.
    pub value: String,
}

/// A `tcpSocket` handler.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PortRecord {
    /// The app's port.
    pub port: u16,
}

/// A `grpc` handler.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GrpcRecord {
    /// The app's port.
    pub port: u16,
    /// The service name asked about; empty (the server as a whole) when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service: Option<String>,
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    /// Written in the order inject always wrote it; the timeout defaults to the kubelet's.
    #[test]
    fn round_trips_in_a_stable_shape() {
        let json = r#"{"app/liveness":{"httpGet":{"path":"/h","port":8080,"scheme":"HTTPS","httpHeaders":[{"name":"X","value":"1"}]},"timeoutSeconds":3},"app/readiness":{"tcpSocket":{"port":8080},"timeoutSeconds":1}}"#;
        let records: ProbeRecords = serde_json::from_str(json).unwrap();
        assert_eq!(serde_json::to_string(&records).unwrap(), json);
        assert_eq!(records["app/liveness"].port(), 8080);
        let defaulted: ProbeRecord = serde_json::from_str(r#"{"grpc":{"port":9}}"#).unwrap();
        assert_eq!((defaulted.timeout_seconds, defaulted.port()), (1, 9));
        let error = serde_json::from_str::<ProbeRecord>(r#"{"tcpSocket":{"host":"db","port":1}}"#)
            .unwrap_err();
        assert!(
            error.to_string().contains("unknown field `host`"),
            "{error}"
        );
    }
}
