//! The lowest layer: error kinds and header rules that every other layer names. Imports
//! nothing from the crate.

pub mod errors;
pub mod headers;
