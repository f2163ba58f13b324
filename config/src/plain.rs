//! Parser and deserialiser errors said in plain words: a tab in the indentation, a line
//! indented to no level around it, a number out of its type's range, a host name where an IP
//! address is needed. Each reads the policy text around the error's position.

use crate::Position;

/// The line `line` (1-based) of `text`.
fn line_of(text: &str, line: usize) -> Option<&str> {
    text.lines().nth(line.checked_sub(1)?)
}

/// The scalar written at `at` (its first line, without quotes or a trailing comment),
/// possibly empty.
pub fn scalar_at(text: &str, at: Position) -> &str {
    let Some(line) = line_of(text, at.line) else {
        return "";
    };
    let start = line
        .char_indices()
        .nth(at.column.saturating_sub(1))
        .map_or(line.len(), |(i, _)| i);
    let rest = &line[start..];
    for quote in ['"', '\''] {
        if let Some(inner) = rest.strip_prefix(quote) {
            return inner.split(quote).next().unwrap_or_default();
        }
    }
    let end = rest.find([',', ']', '}', '#']).unwrap_or(rest.len());
    rest[..end].trim()
}

/// Where the first tab in line `line`'s indentation is, if there is one.
pub fn tab_in_indentation(text: &str, line: usize) -> Option<Position> {
    let content = line_of(text, line)?;
    let indentation = content
        .find(|c: char| c != ' ' && c != '\t')
        .unwrap_or(content.len());
    let tab = content[..indentation].find('\t')?;
    Some(Position {
        line,
        column: tab + 1,
    })
}

/// Leading spaces of `line`, or `None` for a blank or comment-only line (no level).
fn indent(line: &str) -> Option<usize> {
    let trimmed = line.trim_start_matches(' ');
    if trimmed.is_empty() || trimmed.starts_with('#') {
        return None;
    }
    Some(line.len() - trimmed.len())
}

/// Explains the line at `at` as indented to no level of the blocks around it: the message and
/// the position of the line's first character. `None` if its indentation does line up with
/// one of them (then indentation is not what is wrong).
pub fn indentation(text: &str, at: Position) -> Option<(String, Position)> {
    let line = line_of(text, at.line)?;
    let spaces = indent(line)?;
    // The open blocks above the line, outermost first: (indentation, line number).
    let mut open: Vec<(usize, usize)> = Vec::new();
    for (i, above) in text.lines().take(at.line.saturating_sub(1)).enumerate() {
        let Some(level) = indent(above) else { continue };
        while open.last().is_some_and(|&(l, _)| l > level) {
            open.pop();
        }
        match open.last_mut() {
            Some(last) if last.0 == level => last.1 = i + 1,
            _ => open.push((level, i + 1)),
        }
    }
    if open.iter().any(|&(level, _)| level == spaces) {
        return None;
    }
    let around: Vec<String> = open
        .iter()
        .rev()
        .take(3)
        .map(|&(level, line)| format!("{level} (line {line})"))
        .collect();
    let message = format!(
        "bad indentation: this line is indented {spaces} spaces, which lines up with no block \
         above it (their keys are indented {}); YAML nests by indentation, so indent a key \
         exactly as far as the keys beside it",
        around.join(", ")
    );
    Some((
        message,
        Position {
            line: at.line,
            column: spaces + 1,
        },
    ))
}

/// A scalar that is not of the field's type `ty` (as serde names it), for number and boolean
/// fields; `found` is what was written.
pub fn scalar_type(ty: &str, found: &str) -> Option<String> {
    let max = match ty {
        "u8" => u64::from(u8::MAX),
        "u16" => u64::from(u16::MAX),
        "u32" => u64::from(u32::MAX),
        "u64" | "usize" => u64::MAX,
        "f64" | "f32" => {
            return Some(format!("must be a number{}", written(found)));
        }
        "bool" | "a boolean" => return Some(format!("must be true or false{}", written(found))),
        _ => return None,
    };
    Some(format!(
        "must be a whole number from 0 to {max}{}",
        written(found)
    ))
}

fn written(found: &str) -> String {
    if found.is_empty() {
        String::new()
    } else {
        format!(" (found `{}`)", found.escape_default())
    }
}

/// A value that is not an IP address and port, at `path`.
pub fn socket_address(path: &str, found: &str) -> String {
    let mut message = format!(
        "needs an IP address and port, e.g. 127.0.0.1:8080 or [::1]:8080{}",
        written(found)
    );
    if found.parse::<std::net::IpAddr>().is_ok() {
        message.push_str("; the port is missing");
    } else if path.contains(".endpoints") {
        message.push_str("; for a host name, use `dns: host:port` instead of `endpoints`");
    } else if !found.is_empty() {
        message.push_str("; host names are not resolved here");
    }
    message
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scalars_are_read_at_their_position() {
        let text = "a: [ -10, 'x y' ]\nb: localhost:8080 # note\n";
        assert_eq!(scalar_at(text, Position { line: 1, column: 6 }), "-10");
        assert_eq!(
            scalar_at(
                text,
                Position {
                    line: 1,
                    column: 11
                }
            ),
            "x y"
        );
        assert_eq!(
            scalar_at(text, Position { line: 2, column: 4 }),
            "localhost:8080"
        );
        assert_eq!(scalar_at(text, Position { line: 9, column: 1 }), "");
    }

    #[test]
    fn indentation_names_the_levels_around() {
        let text = "services:\n  orders:\n    endpoints: [127.0.0.1:1]\n\n   timeouts: {}\n";
        let (message, at) = indentation(text, Position { line: 5, column: 4 }).expect("bad");
        assert_eq!(at, Position { line: 5, column: 4 });
        assert!(
            message.starts_with(
                "bad indentation: this line is indented 3 spaces, which lines up with no block \
                 above it (their keys are indented 4 (line 3), 2 (line 2), 0 (line 1))"
            ),
            "{message}"
        );
        let aligned = "a:\n  b: 1\n  c 2\n";
        assert_eq!(indentation(aligned, Position { line: 3, column: 3 }), None);
    }
}
