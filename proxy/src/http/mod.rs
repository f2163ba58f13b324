//! Serving HTTP: the listeners, routing by the compiled [`snapshot::Snapshot`], and forwarding
//! a request through its policies. Uses the layers below (`io` and down).

mod attempt;
pub mod authz;
pub mod captured;
pub mod forward;
pub mod lifecycle;
pub mod mirror;
pub mod rescue;
pub mod route_filter;
mod route_index;
pub mod route_match;
pub mod server;
pub mod shared;
pub mod snapshot;
