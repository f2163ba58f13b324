//! `outriderctl validate`: policy files checked offline, every problem at once. Errors are
//! what the control plane and the proxy would refuse; warnings are valid policies that are
//! very likely mistakes (`--strict` refuses them too).

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use outrider_config::limits::MAX_DOCUMENT_BYTES;

use crate::diagnose::render_as;

/// A document was refused (or, with `--strict`, warned about).
const EX_REJECTED: u8 = 1;
/// An input could not be read.
const EX_NOINPUT: u8 = 66;

/// `outriderctl validate`'s flags.
#[derive(Debug, clap::Args)]
pub struct ValidateArgs {
    /// Policy files (YAML); `-` reads standard input, a directory every `*.yaml`/`*.yml` in it
    /// (not its subdirectories). Repeatable.
    #[arg(short = 'f', long = "file", required = true)]
    pub files: Vec<PathBuf>,
    /// Treat warnings (likely mistakes such as `endpoints: []` or a route that never matches)
    /// as errors: exit 1 if there is one. Default: warnings are printed, exit 0.
    #[arg(long, env = "OUTRIDER_VALIDATE_STRICT")]
    pub strict: bool,
}

/// Runs `validate`: each document's errors or warnings on stderr with file:line:column and a
/// caret, one `NAME: valid (sha256 ...)` line per valid document on stdout. Exits 0 if every
/// document is valid, 1 if one has errors (or warnings, with `--strict`), 66 if an input could
/// not be read (the others are still checked).
pub fn main(args: &ValidateArgs) -> ExitCode {
    let mut rejected = false;
    let mut unreadable = false;
    for input in &args.files {
        let documents = match documents(input) {
            Ok(documents) => documents,
            Err(why) => {
                eprintln!("outriderctl: {why}");
                unreadable = true;
                continue;
            }
        };
        for document in documents {
            match document {
                Ok((name, text)) => rejected |= !check(&name, &text, args.strict),
                Err(why) => {
                    eprintln!("outriderctl: {why}");
                    unreadable = true;
                }
            }
        }
    }
    if unreadable {
        ExitCode::from(EX_NOINPUT)
    } else if rejected {
        ExitCode::from(EX_REJECTED)
    } else {
        ExitCode::SUCCESS
    }
}

/// Checks one document and prints what was found; whether it passes.
fn check(name: &str, text: &str, strict: bool) -> bool {
    let checked = outrider_config::check_document(name, text);
    match checked.result {
        Err(error) => {
            eprint!("{}", render_as("error", name, &error.diagnostics, text));
            let count = error.diagnostics.len();
            eprintln!("{name}: {count} {}", plural(count, "error"));
            false
        }
        Ok(_) if strict && !checked.warnings.is_empty() => {
            let label = "error (--strict)";
            eprint!("{}", render_as(label, name, &checked.warnings, text));
            let count = checked.warnings.len();
            eprintln!(
                "{name}: {count} {}, refused by --strict",
                plural(count, "warning")
            );
            false
        }
        Ok(loaded) => {
            eprint!("{}", render_as("warning", name, &checked.warnings, text));
            let count = checked.warnings.len();
            if count == 0 {
                println!("{name}: valid (sha256 {})", loaded.content_hash);
            } else {
                println!(
                    "{name}: valid (sha256 {}), {count} {}",
                    loaded.content_hash,
                    plural(count, "warning")
                );
            }
            true
        }
    }
}

fn plural(count: usize, word: &str) -> String {
    if count == 1 {
        word.to_string()
    } else {
        format!("{word}s")
    }
}

/// A document's name and text, or why it could not be read.
type Document = Result<(String, String), String>;

/// The documents `input` names: standard input for `-`, every `*.yaml`/`*.yml` of a
/// directory in name order, or the file itself.
fn documents(input: &Path) -> Result<Vec<Document>, String> {
    if input == Path::new("-") {
        let text = read_bounded(std::io::stdin().lock())
            .map_err(|e| format!("cannot read standard input: {e}"))?;
        return Ok(vec![Ok(("<stdin>".into(), text))]);
    }
    let shown = input.display().to_string();
    if input.is_dir() {
        let entries = std::fs::read_dir(input).map_err(|e| format!("cannot read {shown}: {e}"))?;
        let mut paths = Vec::new();
        for entry in entries {
            let path = entry
                .map_err(|e| format!("cannot read {shown}: {e}"))?
                .path();
            let yaml = path
                .extension()
                .is_some_and(|ext| ext == "yaml" || ext == "yml");
            if yaml && !path.is_dir() {
                paths.push(path);
            }
        }
        if paths.is_empty() {
            return Err(format!("no *.yaml or *.yml files in {shown}"));
        }
        paths.sort();
        return Ok(paths.iter().map(|path| read_file(path)).collect());
    }
    Ok(vec![read_file(input)])
}

fn read_file(path: &Path) -> Document {
    let name = path.display().to_string();
    let text = std::fs::File::open(path)
        .and_then(read_bounded)
        .map_err(|e| format!("cannot read {name}: {e}"))?;
    Ok((name, text))
}

/// Reads at most one byte more than a policy may have (so the parser names the size budget)
/// instead of all of a runaway input.
fn read_bounded(input: impl Read) -> std::io::Result<String> {
    let limit = u64::try_from(MAX_DOCUMENT_BYTES)
        .unwrap_or(u64::MAX)
        .saturating_add(1);
    let mut text = String::new();
    input.take(limit).read_to_string(&mut text)?;
    Ok(text)
}
