//! Merging policy documents into the one policy a workload's proxies receive.
//!
//! Rules (also in the README):
//! - A document applies to a workload when its `workload:` names it (a *specific* document), or
//!   when it says `"*"` or has no `workload:` at all (a *default* document).
//! - Services: every default document's services, then every specific document's services on
//!   top. A specific document replaces a default service of the same name *whole* (no field by
//!   field merge: what you read in one document is what runs). Two documents of the same tier
//!   defining the same service for one workload is a conflict.
//! - Routes: the specific documents' routes first (documents in name order), then the default
//!   documents' routes; document order breaks ties of match precedence, so a workload's own
//!   routes win over defaults as specific as they are.
//! - `inbound` and `tracing`: a specific document's wins over a default's; two of the same tier
//!   setting one conflict. `access_log`: a specific document's `json` wins over the defaults',
//!   else the defaults' (a document that leaves it out cannot be told from one saying `off`).
//! - Two services of the merged result with the same dedicated `listen` address conflict.
//! - Gateway API routes (HTTPRoute, GRPCRoute documents, [`outrider_config::gateway`]) of the
//!   documents that apply are joined last, by [`outrider_config::gateway::compose`]: after
//!   every policy route, for a workload whose merged services hold a parent Service of theirs.

use std::collections::BTreeMap;
use std::net::SocketAddr;

use outrider_config::{AccessLog, Inbound, Policy, Route, Service, Tracing};

/// How a document relates to a workload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tier {
    /// `workload: "*"` or no `workload:`: defaults for every workload.
    Default,
    /// The document names the workload.
    Specific,
}

/// Whether and how `policy` applies to `workload`. The pseudo-workload `"*"` takes only the
/// default documents (what a workload that no document names receives).
pub fn tier(policy: &Policy, workload: &str) -> Option<Tier> {
    match &policy.workload {
        None => Some(Tier::Default),
        Some(selector) if selector.is_all() => Some(Tier::Default),
        Some(selector) if selector.names().iter().any(|n| n == workload) => Some(Tier::Specific),
        Some(_) => None,
    }
}

/// Two documents that cannot both be in force for a workload.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Conflict {
    /// Both documents define the service.
    #[error(
        "service `{service}` is defined for workload `{workload}` by both `{first}` and `{second}`"
    )]
    Service {
        /// The workload merged.
        workload: String,
        /// The service both define.
        service: String,
        /// One document.
        first: String,
        /// The other.
        second: String,
    },
    /// Both documents set a top-level setting (`inbound`, `tracing`).
    #[error("`{field}` is set for workload `{workload}` by both `{first}` and `{second}`")]
    Setting {
        /// The setting.
        field: &'static str,
        /// The workload merged.
        workload: String,
        /// One document.
        first: String,
        /// The other.
        second: String,
    },
    /// Two services of the merged policy want the same dedicated port.
    #[error("listen address {addr} is used for workload `{workload}` by service `{first_service}` of `{first}` and by service `{second_service}` of `{second}`")]
    Listen {
        /// The workload merged.
        workload: String,
        /// The contested address.
        addr: SocketAddr,
        /// The first service and its document.
        first_service: String,
        /// Its document.
        first: String,
        /// The second service.
        second_service: String,
        /// Its document.
        second: String,
    },
    /// Gateway API routes that do not compose with the workload's policy (a backend that is
    /// no service of it, a field set both by a route and by the entry attached to it).
    #[error("for workload `{workload}`: {error}")]
    Gateway {
        /// The workload merged.
        workload: String,
        /// What is wrong, with the file, line and column of the route document.
        error: outrider_config::gateway::ComposeError,
    },
}

impl Conflict {
    /// Whether `document` is one of the two in conflict.
    pub fn involves(&self, document: &str) -> bool {
        let (a, b) = match self {
            Self::Service { first, second, .. }
            | Self::Setting { first, second, .. }
            | Self::Listen { first, second, .. } => (first, second),
            // Which policy document lacks a route's backend cannot be told: any change that
            // leaves the routes unable to compose is refused.
            Self::Gateway { .. } => return true,
        };
        a == document || b == document
    }
}

/// Merges `docs` (name and policy, in name order) for `workload`. The result has no
/// `workload:` field: it is what one proxy runs.
pub fn merge<'a, I>(workload: &str, docs: I) -> Result<Policy, Box<Conflict>>
where
    I: IntoIterator<Item = (&'a str, &'a Policy)>,
{
    let mut defaults = Layer::default();
    let mut specific = Layer::default();
    for (name, policy) in docs {
        match tier(policy, workload) {
            Some(Tier::Default) => defaults.add(workload, name, policy)?,
            Some(Tier::Specific) => specific.add(workload, name, policy)?,
            None => {}
        }
    }
    let mut services = defaults.services;
    // Whole-service replacement: the specific document's definition, not a blend.
    services.extend(specific.services);
    let mut listeners: BTreeMap<SocketAddr, (&str, &str)> = BTreeMap::new();
    for (service, (definition, doc)) in &services {
        let Some(addr) = definition.listen else {
            continue;
        };
        if let Some((first_service, first)) = listeners.insert(addr, (service, doc)) {
            return Err(Box::new(Conflict::Listen {
                workload: workload.to_string(),
                addr,
                first_service: first_service.to_string(),
                first: first.to_string(),
                second_service: service.clone(),
                second: doc.to_string(),
            }));
        }
    }
    let mut routes = specific.routes;
    routes.extend(defaults.routes);
    let mut gateway = specific.gateway;
    gateway.extend(defaults.gateway);
    let mut merged = Policy {
        workload: None,
        services: services.into_iter().map(|(k, (s, _))| (k, s)).collect(),
        routes,
        inbound: specific
            .inbound
            .or(defaults.inbound)
            .map(|(inbound, _)| inbound),
        tracing: specific
            .tracing
            .or(defaults.tracing)
            .map(|(tracing, _)| tracing),
        access_log: specific
            .access_log
            .or(defaults.access_log)
            .unwrap_or_default(),
        mesh_tls: specific.mesh_tls.or(defaults.mesh_tls).unwrap_or_default(),
        opaque_ports: specific.opaque_ports.or(defaults.opaque_ports),
        gateway: Vec::new(),
    };
    outrider_config::gateway::compose(&mut merged, &gateway).map_err(|error| {
        Box::new(Conflict::Gateway {
            workload: workload.to_string(),
            error,
        })
    })?;
    Ok(merged)
}

/// The documents of one tier, each item remembering the document it came from.
#[derive(Default)]
struct Layer<'a> {
    services: BTreeMap<String, (Service, &'a str)>,
    routes: Vec<Route>,
    inbound: Option<(Inbound, &'a str)>,
    tracing: Option<(Tracing, &'a str)>,
    access_log: Option<AccessLog>,
    mesh_tls: Option<outrider_config::MeshTls>,
    opaque_ports: Option<Vec<u16>>,
    gateway: Vec<&'a outrider_config::gateway::GatewayRoutes>,
}

impl<'a> Layer<'a> {
    fn add(
        &mut self,
        workload: &str,
        name: &'a str,
        policy: &'a Policy,
    ) -> Result<(), Box<Conflict>> {
        for (service, definition) in &policy.services {
            if let Some((_, first)) = self.services.get(service) {
                return Err(Box::new(Conflict::Service {
                    workload: workload.to_string(),
                    service: service.clone(),
                    first: first.to_string(),
                    second: name.to_string(),
                }));
            }
            self.services
                .insert(service.clone(), (definition.clone(), name));
        }
        self.routes.extend(policy.routes.iter().cloned());
        self.gateway.extend(&policy.gateway);
        set_once(
            &mut self.inbound,
            policy.inbound.as_ref(),
            "inbound",
            workload,
            name,
        )?;
        set_once(
            &mut self.tracing,
            policy.tracing.as_ref(),
            "tracing",
            workload,
            name,
        )?;
        if policy.access_log != AccessLog::default() {
            self.access_log = Some(policy.access_log);
        }
        if !policy.mesh_tls.is_off() {
            self.mesh_tls = Some(policy.mesh_tls);
        }
        if policy.opaque_ports.is_some() {
            self.opaque_ports.clone_from(&policy.opaque_ports);
        }
        Ok(())
    }
}

/// Takes `value` from document `name` into `slot` unless another document already set it.
fn set_once<'a, T: Clone>(
    slot: &mut Option<(T, &'a str)>,
    value: Option<&T>,
    field: &'static str,
    workload: &str,
    name: &'a str,
) -> Result<(), Box<Conflict>> {
    let Some(value) = value else {
        return Ok(());
    };
    if let Some((_, first)) = slot {
        return Err(Box::new(Conflict::Setting {
            field,
            workload: workload.to_string(),
            first: first.to_string(),
            second: name.to_string(),
        }));
    }
    *slot = Some((value.clone(), name));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn doc(text: &str) -> Policy {
        outrider_config::load("t.yaml", text).expect("valid").policy
    }

    #[test]
    fn specific_replaces_default_service_whole_and_routes_come_first() {
        let defaults = doc("workload: \"*\"
services:
  payments: { endpoints: [127.0.0.1:1], retries: { attempts: 2 } }
  reviews: { endpoints: [127.0.0.1:2] }
routes:
  - { match: { authority: payments }, service: payments }
");
        let checkout = doc("workload: [checkout, cart]
services:
  payments: { endpoints: [127.0.0.1:9] }
routes:
  - { name: pay-v2, match: { authority: payments, path_prefix: /v2/ }, service: payments }
");
        let docs = [("defaults.yaml", &defaults), ("checkout.yaml", &checkout)];
        let merged = merge("checkout", docs).expect("merges");
        let payments = &merged.services["payments"];
        assert_eq!(
            payments.endpoints,
            Some(vec!["127.0.0.1:9".parse().expect("addr")])
        );
        assert_eq!(payments.retries, None, "no field-by-field blend");
        assert!(merged.services.contains_key("reviews"));
        assert_eq!(merged.routes.len(), 2);
        assert_eq!(merged.routes[0].name.as_deref(), Some("pay-v2"));
        assert_eq!(merged.workload, None);

        let other = merge("search", docs).expect("merges");
        assert_eq!(other.routes.len(), 1);
        assert!(other.services["payments"].retries.is_some());
        assert_eq!(merge("*", docs).expect("merges"), other);
    }

    #[test]
    fn same_service_twice_for_one_workload_names_both_documents() {
        let a = doc("workload: checkout\nservices: { x: { endpoints: [127.0.0.1:1] } }\n");
        let b = doc("workload: [cart, checkout]\nservices: { x: { endpoints: [127.0.0.1:2] } }\n");
        let err = merge("checkout", [("a.yaml", &a), ("b.yaml", &b)]).expect_err("conflict");
        assert_eq!(
            err.to_string(),
            "service `x` is defined for workload `checkout` by both `a.yaml` and `b.yaml`"
        );
        assert!(err.involves("a.yaml") && err.involves("b.yaml") && !err.involves("c"));
        // Different workloads: no conflict.
        merge("cart", [("a.yaml", &a), ("b.yaml", &b)]).expect("only b applies");
    }

    #[test]
    fn listen_clash_across_documents_names_both() {
        let d = doc("services: { x: { endpoints: [127.0.0.1:1], listen: 127.0.0.1:9001 } }\n");
        let s = doc(
            "workload: w\nservices: { y: { endpoints: [127.0.0.1:2], listen: 127.0.0.1:9001 } }\n",
        );
        let err = merge("w", [("d.yaml", &d), ("s.yaml", &s)]).expect_err("clash");
        assert!(
            matches!(&*err, Conflict::Listen { first, second, .. } if first == "d.yaml" && second == "s.yaml"),
            "{err}"
        );
        // Overriding the default service itself moves its port: no clash.
        let o = doc(
            "workload: w\nservices: { x: { endpoints: [127.0.0.1:2], listen: 127.0.0.1:9001 } }\n",
        );
        merge("w", [("d.yaml", &d), ("o.yaml", &o)]).expect("replaced");
    }

    #[test]
    fn inbound_specific_wins_and_two_specific_conflict() {
        let d = doc("inbound: { app: 127.0.0.1:8080 }\n");
        let s = doc("workload: w\ninbound: { app: 127.0.0.1:9090 }\n");
        let t = doc("workload: w\ninbound: { app: 127.0.0.1:7070 }\n");
        let merged = merge("w", [("d", &d), ("s", &s)]).expect("merges");
        assert_eq!(
            merged.inbound.map(|i| i.app),
            Some("127.0.0.1:9090".parse().expect("addr"))
        );
        assert!(matches!(
            merge("w", [("s", &s), ("t", &t)]).map_err(|e| *e),
            Err(Conflict::Setting {
                field: "inbound",
                ..
            })
        ));
    }
}
