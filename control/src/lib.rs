//! Outrider's control plane: validates, versions, persists and pushes YAML policy to proxies,
//! and `outriderctl`, the operator's CLI.
//!
//! Each concern is a module: `diagnose` renders policy errors for people, `inject` adds the
//! sidecar to Kubernetes manifests, `wait` holds a legacy sidecar's pod until the proxy is ready.

pub mod diagnose;
pub mod inject;
pub mod wait;
