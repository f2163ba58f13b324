//! The lowest layer: error kinds, header and method rules, and the stop signal that every other layer
//! names. Imports nothing from the crate.

pub mod errors;
pub mod headers;
pub mod methods;
pub mod shutdown;
