//! The lowest layer: error kinds, header and method rules, and the stop signal that every other layer
//! names. Imports nothing from the crate.

pub mod errors;
pub mod headers;
pub mod methods;
pub mod shutdown;

/// Shows a list of displayable items comma-separated (`10.0.0.1:80,10.0.0.2:80`): log fields
/// take the items' own text, not Rust's debug form of the list.
pub struct DisplayList<'a, T>(pub &'a [T]);

impl<T: std::fmt::Display> std::fmt::Display for DisplayList<'_, T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for (i, item) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            item.fmt(f)?;
        }
        Ok(())
    }
}
