//! The policy schema: what an operator writes in YAML. Every struct rejects unknown fields so a
//! typo (`endpoint:` for `endpoints:`) is an error, not a silently ignored setting.

use std::collections::BTreeMap;
use std::net::SocketAddr;

use serde::{Deserialize, Serialize};

use crate::Duration;

/// A whole policy document: upstream services, outbound routes and the inbound side.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Policy {
    /// Named upstream services, by name.
    #[serde(default)]
    pub services: BTreeMap<String, Service>,
    /// Routes for the shared outbound port, matched in order; the first match wins.
    #[serde(default)]
    pub routes: Vec<Route>,
    /// The inbound listener's settings (the local app it fronts).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub inbound: Option<Inbound>,
}

/// An upstream service and how to reach it.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Service {
    /// Static endpoints. Exactly one of `endpoints` and `dns` must be set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endpoints: Option<Vec<SocketAddr>>,
    /// A `host:port` re-resolved periodically; every A/AAAA record is an endpoint.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dns: Option<String>,
    /// A dedicated local port: everything arriving there goes to this service.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub listen: Option<SocketAddr>,
    /// The protocol spoken to the upstream.
    #[serde(default)]
    pub protocol: Protocol,
    /// How an endpoint is picked for each request.
    #[serde(default)]
    pub load_balancing: LoadBalancing,
    /// Connection-level timeouts.
    #[serde(default)]
    pub timeouts: Timeouts,
}

/// The protocol spoken to an upstream (or to the local app).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    /// HTTP/1.1 with keep-alive.
    #[default]
    Http1,
    /// HTTP/2 over cleartext with prior knowledge (h2c); required for gRPC.
    Http2,
}

/// How an endpoint is chosen for a request.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LoadBalancing {
    /// Each endpoint in turn.
    #[default]
    RoundRobin,
    /// Power of two choices: the less loaded of two random endpoints.
    LeastRequest,
}

/// Timeouts of a service.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Timeouts {
    /// Bound on establishing a TCP connection to an endpoint.
    #[serde(default = "Timeouts::default_connect")]
    pub connect: Duration,
}

impl Timeouts {
    fn default_connect() -> Duration {
        Duration::from_secs(1)
    }
}

impl Default for Timeouts {
    fn default() -> Self {
        Self {
            connect: Self::default_connect(),
        }
    }
}

/// A route on the shared outbound port.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Route {
    /// A name for metrics and logs; `route-<index>` when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// What requests this route takes.
    #[serde(rename = "match")]
    pub matches: RouteMatch,
    /// The single service this route sends to. Exactly one of `service` and `split`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service: Option<String>,
    /// A weighted traffic split across services.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub split: Option<Vec<WeightedService>>,
}

/// Conditions a request must meet to take a route; all that are set must hold.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteMatch {
    /// The Host / :authority, without port, compared case-insensitively.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub authority: Option<String>,
    /// A prefix of the request path; must start with `/`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path_prefix: Option<String>,
}

/// One leg of a traffic split.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WeightedService {
    /// The service name.
    pub service: String,
    /// Relative weight; must be > 0.
    pub weight: u32,
}

/// The inbound listener's settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Inbound {
    /// The local app behind the inbound listener.
    pub app: SocketAddr,
    /// The protocol the local app speaks.
    #[serde(default)]
    pub protocol: Protocol,
    /// Bound on connecting to the local app.
    #[serde(default)]
    pub timeouts: Timeouts,
}
