//! Outrider's control plane: validates, versions, persists and pushes YAML policy to proxies,
//! and `outriderctl`, the operator's CLI.
//!
//! Each concern is a module: `diagnose` renders policy errors for people.

pub mod diagnose;
