//! Outrider's control plane: validates, versions, persists and pushes YAML policy to proxies,
//! and `outriderctl`, the operator's CLI.
//!
//! - [`merge`]: the documents that apply to a workload, merged into the policy it runs.
//! - [`store`]: versions, history and [`rejections`], persisted atomically in the state
//!   directory or, shared by several replicas, in etcd ([`etcd`]).
//! - [`engine`]: accepting or rejecting changes, per-workload push channels, proxy tracking;
//!   [`registry`]: the proxies, one live session each; [`discovery`]: the service registry
//!   (`discovery: registry`), the addresses proxies registered under a TTL.
//! - [`watcher`]: the watched policy directory (ConfigMap volumes included).
//! - [`gateway`]: Gateway API route documents named in listings (their translation and
//!   composition are [`outrider_config::gateway`]'s).
//! - [`ca`]: the mesh CA issuing short-lived SPIFFE workload certificates.
//! - [`metrics`]: the control plane's own Prometheus metrics (`/metrics`).
//! - [`server`]: the HTTP server (subscriptions, ACKs, the management API).
//! - [`api`]: the management API's JSON bodies; [`diagnose`]: policy errors for terminals.
//! - [`cli`]: the `outriderctl` commands that talk to the control plane; [`check`]: what
//!   `outriderctl check` finds and how to fix it; [`output`]: `-o json|yaml` and colour.
//! - [`validate`]: `outriderctl validate`, policy files checked offline.
//! - [`inject`] adds the sidecar to Kubernetes manifests, [`wait`] holds a legacy sidecar's pod
//!   until the proxy is ready; [`yaml`] is the manifest value it edits.
//! - [`fuzzing`]: the entry point of the policy fuzz target (not an API).

pub mod api;
pub mod ca;
pub mod check;
pub mod cli;
pub mod diagnose;
pub mod discovery;
pub mod engine;
pub mod etcd;
pub mod fuzzing;
pub mod gateway;
pub mod inject;
pub mod merge;
pub mod metrics;
pub mod output;
pub mod registry;
pub mod rejections;
pub mod replica;
pub mod routes;
pub mod server;
pub mod service_account;
pub mod store;
pub mod validate;
pub mod wait;
pub mod watcher;
pub mod yaml;
