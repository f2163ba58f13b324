//! How `outriderctl` prints: `-o text|json|yaml` for the read commands, and colour only on a
//! terminal that wants it (`NO_COLOR`, <https://no-color.org>, turns it off).
//!
//! The JSON and YAML field names are the management API's ([`crate::api`]) and stable; the
//! README lists them. Text is for people and may change.

use std::io::IsTerminal as _;

use serde::Serialize;

/// `-o`: how a read command prints its answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum Format {
    /// Tables and sentences, for people.
    #[default]
    Text,
    /// One JSON document (the API's field names), for scripts.
    Json,
    /// The same document as YAML.
    Yaml,
}

/// `-o` flag shared by the read commands.
#[derive(Debug, Clone, Copy, clap::Args)]
pub struct OutputArg {
    /// Output format: text, json or yaml (stable field names, see the README).
    #[arg(short = 'o', long = "output", value_enum, default_value_t = Format::Text)]
    pub output: Format,
}

/// `value` as JSON (pretty, with a final newline) or YAML; `None` for [`Format::Text`].
pub fn structured<T: Serialize>(format: Format, value: &T) -> Option<String> {
    match format {
        Format::Text => None,
        Format::Json => Some(
            serde_json::to_string_pretty(value)
                .map(|mut s| {
                    s.push('\n');
                    s
                })
                .unwrap_or_else(|e| format!("{{\"error\": \"cannot encode: {e}\"}}\n")),
        ),
        Format::Yaml => Some(
            serde_saphyr::to_string(value)
                .unwrap_or_else(|e| format!("error: cannot encode: {e}\n")),
        ),
    }
}

/// Whether to colour what goes to stdout: a terminal, and `NO_COLOR` unset or empty.
pub fn stdout_colour() -> bool {
    wants_colour(
        std::io::stdout().is_terminal(),
        std::env::var_os("NO_COLOR").as_deref(),
    )
}

/// Whether to colour what goes to stderr.
pub fn stderr_colour() -> bool {
    wants_colour(
        std::io::stderr().is_terminal(),
        std::env::var_os("NO_COLOR").as_deref(),
    )
}

/// The decision, apart from the environment: colour on a terminal unless `NO_COLOR` is set to
/// anything non-empty.
pub fn wants_colour(terminal: bool, no_colour: Option<&std::ffi::OsStr>) -> bool {
    terminal && no_colour.is_none_or(|v| v.is_empty())
}

/// A colour of the few `outriderctl` uses.
#[derive(Debug, Clone, Copy)]
pub enum Paint {
    /// Errors, removed lines.
    Red,
    /// Warnings.
    Yellow,
    /// Success, added lines.
    Green,
    /// Headers.
    Bold,
}

/// `text` in `paint` when `on`, else as it is.
pub fn paint(on: bool, paint: Paint, text: &str) -> String {
    if !on {
        return text.to_string();
    }
    let code = match paint {
        Paint::Red => "31",
        Paint::Yellow => "33",
        Paint::Green => "32",
        Paint::Bold => "1",
    };
    format!("\x1b[{code}m{text}\x1b[0m")
}

/// A unified diff with removed lines red and added lines green when `on`.
pub fn paint_diff(on: bool, diff: &str) -> String {
    if !on {
        return diff.to_string();
    }
    let mut out = String::with_capacity(diff.len());
    for line in diff.split_inclusive('\n') {
        let (body, newline) = line
            .strip_suffix('\n')
            .map_or((line, ""), |body| (body, "\n"));
        let painted = if body.starts_with("+++") || body.starts_with("---") {
            paint(true, Paint::Bold, body)
        } else if body.starts_with('+') {
            paint(true, Paint::Green, body)
        } else if body.starts_with('-') {
            paint(true, Paint::Red, body)
        } else {
            body.to_string()
        };
        out.push_str(&painted);
        out.push_str(newline);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn colour_only_on_a_terminal_without_no_color() {
        use std::ffi::OsStr;
        assert!(wants_colour(true, None));
        assert!(wants_colour(true, Some(OsStr::new(""))));
        assert!(!wants_colour(true, Some(OsStr::new("1"))));
        assert!(!wants_colour(false, None));
    }

    #[test]
    fn diffs_are_painted_line_by_line() {
        let diff = "--- a\n+++ b\n@@ -1 +1 @@\n-old\n+new\n";
        assert_eq!(paint_diff(false, diff), diff);
        let painted = paint_diff(true, diff);
        assert!(painted.contains("\x1b[31m-old\x1b[0m\n"), "{painted:?}");
        assert!(painted.contains("\x1b[32m+new\x1b[0m\n"), "{painted:?}");
        assert!(painted.contains("\x1b[1m+++ b\x1b[0m\n"), "{painted:?}");
    }

    #[test]
    fn json_and_yaml_use_the_field_names() {
        #[derive(Serialize)]
        struct V {
            version: u64,
        }
        assert_eq!(
            structured(Format::Json, &V { version: 3 }).as_deref(),
            Some("{\n  \"version\": 3\n}\n")
        );
        assert_eq!(
            structured(Format::Yaml, &V { version: 3 }).as_deref(),
            Some("version: 3\n")
        );
        assert_eq!(structured(Format::Text, &V { version: 3 }), None);
    }
}
