//! Errors of policy loading: every problem with its path and position in the file.

use std::fmt;

use crate::position::Position;

/// One problem in a policy file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Diagnostic {
    /// The path of the offending value (`routes[1].split[0].weight`); empty for syntax errors.
    pub path: String,
    /// What is wrong, for a human.
    pub message: String,
    /// Where in the file, when known.
    pub position: Option<Position>,
}

/// A policy file that was rejected, with every problem found in it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct PolicyError {
    /// The file name as given to the loader, used in messages.
    pub file: String,
    /// The problems, in file order where positions are known.
    pub diagnostics: Vec<Diagnostic>,
}

impl fmt::Display for PolicyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, d) in self.diagnostics.iter().enumerate() {
            if i > 0 {
                f.write_str("\n")?;
            }
            if !d.path.is_empty() {
                write!(f, "{}: ", d.path)?;
            }
            f.write_str(&d.message)?;
            match d.position {
                Some(p) => write!(f, " at {}:{}:{}", self.file, p.line, p.column)?,
                None => write!(f, " in {}", self.file)?,
            }
        }
        Ok(())
    }
}
