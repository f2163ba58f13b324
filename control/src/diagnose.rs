//! Renders a [`PolicyError`] for a terminal: each problem with its position, the offending
//! line of the file and a caret under the spot, like a compiler does.

use std::fmt::Write;

use outrider_config::{Diagnostic, PolicyError};

/// Every diagnostic of `error` against `text` (the file it came from), one block each.
pub fn render(error: &PolicyError, text: &str) -> String {
    render_as("error", &error.file, &error.diagnostics, text)
}

/// Each of `diagnostics` of `file` against `text`, one block each, headed `label:` (`error`,
/// `warning`).
pub fn render_as(label: &str, file: &str, diagnostics: &[Diagnostic], text: &str) -> String {
    let lines: Vec<&str> = text.lines().collect();
    let mut out = String::new();
    for d in diagnostics {
        let what = if d.path.is_empty() {
            d.message.clone()
        } else {
            format!("{}: {}", d.path, d.message)
        };
        match d.position {
            Some(p) => {
                let _ = writeln!(out, "{label}: {what}\n  --> {file}:{}:{}", p.line, p.column);
                if let Some(line) = p.line.checked_sub(1).and_then(|i| lines.get(i)) {
                    let gutter = p.line.to_string();
                    let pad = " ".repeat(gutter.len());
                    let (shown, caret) = window(line, p.column);
                    let _ = writeln!(out, "{pad} |\n{gutter} | {shown}");
                    let _ = writeln!(out, "{pad} | {}^", " ".repeat(caret));
                }
            }
            None => {
                let _ = writeln!(out, "{label}: {what}\n  --> {file}");
            }
        }
    }
    out
}

/// Characters shown each side of the column: a refused document may be one 200 KB line.
const WINDOW: usize = 60;

/// The part of `line` around 1-based `column` that is shown, and the caret's offset in it.
fn window(line: &str, column: usize) -> (String, usize) {
    let at = column.saturating_sub(1);
    let start = at.saturating_sub(WINDOW);
    // A tab is shown as one visible column, so the caret stays aligned and the tab is seen.
    let mut shown: String = line
        .chars()
        .skip(start)
        .take(2 * WINDOW)
        .map(|c| if c == '\t' { '→' } else { c })
        .collect();
    let mut caret = at - start;
    if start > 0 {
        shown.insert_str(0, "...");
        caret += 3;
    }
    if line.chars().count() > start + 2 * WINDOW {
        shown.push_str("...");
    }
    (shown, caret)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn caret_sits_under_the_column() {
        let text = "services:\n  a:\n    endpoints: [127.0.0.1:1]\nroutes:\n  - service: nope\n";
        let error = outrider_config::load("p.yaml", text).expect_err("unknown service");
        let rendered = render(&error, text);
        assert!(rendered.contains("--> p.yaml:5:"), "{rendered}");
        let caret_line = rendered
            .lines()
            .find(|l| l.trim_end().ends_with('^'))
            .expect("a caret line");
        let source_line = rendered
            .lines()
            .find(|l| l.contains("- service: nope"))
            .expect("the source line");
        let column = error.diagnostics[0].position.expect("position").column;
        // Both lines share the gutter, so the caret's offset is the column's.
        let gutter = source_line.find("| ").expect("gutter") + 2;
        assert_eq!(
            caret_line.find('^'),
            Some(gutter + column - 1),
            "{rendered}"
        );
    }
}
