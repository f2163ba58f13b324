//! Bytes on sockets: connecting and TLS, the mesh identity's certificates, the upstream
//! pools and codecs, body types, downstream connection budgets. Below `http`; uses `core`,
//! `policy`, `trace` and `telemetry`.

pub mod body;
pub mod classify;
pub mod completion;
pub mod connect;
pub mod connection;
pub mod detect;
pub mod identity;
pub mod opaque;
pub mod original_dst;
pub mod outcome;
pub mod pool;
pub mod request_body;
pub mod rewind;
pub mod tee;
pub mod tls;
pub mod upstream;
