//! The proxy's layering, checked over its sources: every module sits in a layer named by its
//! top folder under `proxy/src/`, and a `crate::` path (in a `use` or inline) may only name a
//! module of its own layer or of a layer below. Among modules the imports form no cycle.
//!
//! The test reads the sources as text (comments and literals skipped) and names the offending
//! `file:line` and edge. The layer map is in the README's Layout section.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

/// The layers, lowest first. A module's layer is its top folder under `proxy/src/`; `lib.rs`
/// and the files beside it are `app`. `main.rs` is its own crate and imports the library by
/// name. A new top folder must be added here.
const LAYERS: &[&str] = &[
    "core",
    // `outrider-proxy init`: the netfilter rules, standalone (std, clap, thiserror only).
    "capture",
    "policy",
    "trace",
    "telemetry",
    "io",
    "http",
    "control",
    "app",
];

/// One `crate::`-rooted reference found in a file.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Reference {
    /// The referenced path without `crate::`, e.g. `["policy", "retry", "RetryPolicy"]`.
    path: Vec<String>,
    /// The line it starts on (1-based).
    line: usize,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Token {
    Ident(String),
    /// `::`
    PathSep,
    Punct(char),
}

/// The tokens of a Rust source, with their lines, skipping comments, strings, chars, lifetimes
/// and numbers.
fn tokenize(src: &str) -> Vec<(Token, usize)> {
    let chars: Vec<char> = src.chars().collect();
    let mut out = Vec::new();
    let mut line = 1;
    let mut i = 0;
    let count_lines =
        |from: usize, to: usize| chars[from..to].iter().filter(|&&c| c == '\n').count();
    while i < chars.len() {
        let c = chars[i];
        let next = chars.get(i + 1).copied();
        if c == '\n' {
            line += 1;
            i += 1;
        } else if c.is_whitespace() {
            i += 1;
        } else if c == '/' && next == Some('/') {
            while i < chars.len() && chars[i] != '\n' {
                i += 1;
            }
        } else if c == '/' && next == Some('*') {
            let start = i;
            let mut depth = 0;
            while i < chars.len() {
                if chars[i] == '/' && chars.get(i + 1) == Some(&'*') {
                    depth += 1;
                    i += 2;
                } else if chars[i] == '*' && chars.get(i + 1) == Some(&'/') {
                    depth -= 1;
                    i += 2;
                    if depth == 0 {
                        break;
                    }
                } else {
                    i += 1;
                }
            }
            line += count_lines(start, i);
        } else if c == '"' {
            let start = i;
            i += 1;
            while i < chars.len() && chars[i] != '"' {
                i += if chars[i] == '\\' { 2 } else { 1 };
            }
            i += 1;
            line += count_lines(start, i.min(chars.len()));
        } else if (c == 'r' || c == 'b') && is_raw_string_start(&chars, i) {
            let start = i;
            while chars[i] != 'r' {
                i += 1;
            }
            i += 1;
            let mut hashes = 0;
            while chars[i] == '#' {
                hashes += 1;
                i += 1;
            }
            i += 1; // the opening quote
            loop {
                if i >= chars.len() {
                    break;
                }
                if chars[i] == '"' && (1..=hashes).all(|k| chars.get(i + k) == Some(&'#')) {
                    i += 1 + hashes;
                    break;
                }
                i += 1;
            }
            line += count_lines(start, i.min(chars.len()));
        } else if c == 'b' && next == Some('"') {
            i += 1; // the string branch takes it from the quote
        } else if c == '\'' {
            // A char literal ('x', '\n', '\u{..}') or a lifetime ('a).
            if next == Some('\\') {
                i += 2;
                while i < chars.len() && chars[i] != '\'' {
                    i += 1;
                }
                i += 1;
            } else if chars.get(i + 2) == Some(&'\'') {
                i += 3;
            } else {
                i += 1;
                while i < chars.len() && (chars[i].is_alphanumeric() || chars[i] == '_') {
                    i += 1;
                }
            }
        } else if c.is_ascii_digit() {
            while i < chars.len() && (chars[i].is_alphanumeric() || chars[i] == '_') {
                i += 1;
            }
        } else if c.is_alphabetic() || c == '_' {
            let start = i;
            while i < chars.len() && (chars[i].is_alphanumeric() || chars[i] == '_') {
                i += 1;
            }
            let word: String = chars[start..i].iter().collect();
            let word = word.strip_prefix("r#").map(str::to_owned).unwrap_or(word);
            out.push((Token::Ident(word), line));
        } else if c == ':' && next == Some(':') {
            out.push((Token::PathSep, line));
            i += 2;
        } else {
            out.push((Token::Punct(c), line));
            i += 1;
        }
    }
    out
}

/// `r"`, `r#"`, `br"`, `br#"` at `i`, and not the tail of an identifier.
fn is_raw_string_start(chars: &[char], i: usize) -> bool {
    if i > 0 && (chars[i - 1].is_alphanumeric() || chars[i - 1] == '_') {
        return false;
    }
    let mut j = i;
    if chars[j] == 'b' {
        j += 1;
    }
    if chars.get(j) != Some(&'r') {
        return false;
    }
    j += 1;
    while chars.get(j) == Some(&'#') {
        j += 1;
    }
    chars.get(j) == Some(&'"')
}

/// Every path rooted at `crate`, `super` or `self` in `src`, resolved against `module` (the
/// file's own module path), expanding `{a, b::{c, d}}` groups. A `use` of a module adds its
/// name as an alias, so a later `alias::Item` counts too.
fn references(src: &str, module: &[String]) -> Vec<Reference> {
    let tokens = tokenize(src);
    let mut refs = Vec::new();
    // Inline modules (`mod tests { .. }`): their names and the brace depth they close at.
    let mut inline: Vec<(String, usize)> = Vec::new();
    let mut depth = 0usize;
    let mut aliases: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let mut i = 0;
    while i < tokens.len() {
        let (token, line) = &tokens[i];
        match token {
            Token::Punct('{') => depth += 1,
            Token::Punct('}') => {
                depth = depth.saturating_sub(1);
                if inline.last().is_some_and(|(_, d)| *d == depth) {
                    inline.pop();
                }
            }
            Token::Ident(word) if word == "mod" => {
                if let (Some((Token::Ident(name), _)), Some((Token::Punct('{'), _))) =
                    (tokens.get(i + 1), tokens.get(i + 2))
                {
                    inline.push((name.clone(), depth));
                }
            }
            Token::Ident(word)
                if matches!(word.as_str(), "crate" | "super" | "self")
                    && tokens.get(i + 1).map(|t| &t.0) == Some(&Token::PathSep)
                    && !follows_path_sep(&tokens, i) =>
            {
                let mut here: Vec<String> = module.to_vec();
                here.extend(inline.iter().map(|(name, _)| name.clone()));
                let mut base = match word.as_str() {
                    "crate" => Vec::new(),
                    _ => here.clone(),
                };
                let mut j = i;
                if word != "crate" {
                    // `super::super::x` climbs once per `super`.
                    while let Some((Token::Ident(w), _)) = tokens.get(j) {
                        if w == "super" {
                            base.pop();
                        } else if w != "self" {
                            break;
                        }
                        if tokens.get(j + 1).map(|t| &t.0) != Some(&Token::PathSep) {
                            break;
                        }
                        j += 2;
                    }
                } else {
                    j += 2;
                }
                let in_use = is_in_use(&tokens, i);
                let (paths, end) = parse_tree(&tokens, j, &base);
                for path in paths {
                    if in_use {
                        if let Some(last) = path.last() {
                            aliases.insert(last.clone(), path.clone());
                        }
                    }
                    refs.push(Reference { path, line: *line });
                }
                i = end;
                continue;
            }
            Token::Ident(word)
                if tokens.get(i + 1).map(|t| &t.0) == Some(&Token::PathSep)
                    && !follows_path_sep(&tokens, i)
                    && aliases.contains_key(word) =>
            {
                let base = aliases[word].clone();
                let (paths, end) = parse_tree(&tokens, i + 2, &base);
                refs.extend(
                    paths
                        .into_iter()
                        .map(|path| Reference { path, line: *line }),
                );
                i = end;
                continue;
            }
            _ => {}
        }
        i += 1;
    }
    refs
}

fn follows_path_sep(tokens: &[(Token, usize)], i: usize) -> bool {
    i > 0 && tokens[i - 1].0 == Token::PathSep
}

/// Whether the path at `i` is the root of a `use` item (`use crate::..`, `pub use super::..`).
fn is_in_use(tokens: &[(Token, usize)], i: usize) -> bool {
    i > 0 && tokens[i - 1].0 == Token::Ident("use".to_owned())
}

/// Parses a path tree at `j` under `base`: `a::b`, `a::{b, c::d}`, `{a, b}`, `*`. Returns the
/// full paths and the index after the tree.
fn parse_tree(
    tokens: &[(Token, usize)],
    mut j: usize,
    base: &[String],
) -> (Vec<Vec<String>>, usize) {
    let mut path = base.to_vec();
    loop {
        match tokens.get(j).map(|t| &t.0) {
            Some(Token::Ident(w)) => {
                path.push(w.clone());
                j += 1;
                if tokens.get(j).map(|t| &t.0) == Some(&Token::PathSep) {
                    j += 1;
                    continue;
                }
                return (vec![path], j);
            }
            Some(Token::Punct('{')) => {
                j += 1;
                let mut all = Vec::new();
                loop {
                    match tokens.get(j).map(|t| &t.0) {
                        Some(Token::Punct('}')) => return (all, j + 1),
                        Some(Token::Punct(',')) => j += 1,
                        None => return (all, j),
                        _ => {
                            let (paths, end) = parse_tree(tokens, j, &path);
                            // `self` inside a group names the group's own module.
                            all.extend(paths.into_iter().map(|mut p| {
                                if p.last().map(String::as_str) == Some("self") {
                                    p.pop();
                                }
                                p
                            }));
                            // Skip `as alias`.
                            j = end;
                            if tokens.get(j).map(|t| &t.0) == Some(&Token::Ident("as".to_owned())) {
                                j += 2;
                            }
                        }
                    }
                }
            }
            Some(Token::Punct('*')) => return (vec![path], j + 1),
            _ => return (vec![path], j),
        }
    }
}

/// A source file and the module it defines.
struct SourceFile {
    /// Relative to `proxy/src`, with `/`.
    rel: String,
    module: Vec<String>,
    text: String,
}

fn source_files() -> Vec<SourceFile> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    let mut stack = vec![root.clone()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).expect("read proxy/src") {
            let path: PathBuf = entry.expect("a directory entry").path();
            if path.is_dir() {
                stack.push(path);
            } else if path.extension().is_some_and(|e| e == "rs") {
                let rel = path
                    .strip_prefix(&root)
                    .expect("under proxy/src")
                    .to_string_lossy()
                    .replace('\\', "/");
                if rel == "main.rs" {
                    continue;
                }
                let text = std::fs::read_to_string(&path).expect("read a source file");
                files.push(SourceFile {
                    module: module_of(&rel),
                    rel,
                    text,
                });
            }
        }
    }
    files.sort_by(|a, b| a.rel.cmp(&b.rel));
    files
}

/// `policy/retry.rs` -> `policy::retry`; `pool/mod.rs` -> `pool`; `lib.rs` -> the root.
fn module_of(rel: &str) -> Vec<String> {
    let stem = rel.strip_suffix(".rs").unwrap_or(rel);
    let mut parts: Vec<String> = stem.split('/').map(str::to_owned).collect();
    if parts.last().is_some_and(|p| p == "mod" || p == "lib") {
        parts.pop();
    }
    parts
}

/// The layer a module lives in: its top folder, or `app` for the crate root and root files.
fn layer_of(module: &[String], folders: &BTreeSet<String>) -> String {
    match module.first() {
        Some(top) if folders.contains(top) => top.clone(),
        _ => "app".to_owned(),
    }
}

fn rank(layer: &str) -> usize {
    LAYERS
        .iter()
        .position(|l| *l == layer)
        .unwrap_or_else(|| panic!("proxy/src/{layer}/ is not a layer; add it to LAYERS"))
}

/// The module (file) a path names: its longest prefix that is a file's module.
fn target_module(path: &[String], modules: &BTreeSet<Vec<String>>) -> Vec<String> {
    (0..=path.len())
        .rev()
        .map(|n| path[..n].to_vec())
        .find(|prefix| modules.contains(prefix))
        .unwrap_or_default()
}

/// One module-to-module edge with where it was first seen.
struct Edge {
    from: Vec<String>,
    to: Vec<String>,
    at: String,
}

fn edges(files: &[SourceFile]) -> Vec<Edge> {
    let modules: BTreeSet<Vec<String>> = files.iter().map(|f| f.module.clone()).collect();
    let mut seen = BTreeSet::new();
    let mut edges = Vec::new();
    for file in files {
        for reference in references(&file.text, &file.module) {
            let to = target_module(&reference.path, &modules);
            // The crate root declares every module and sits on top; a module naming itself
            // is no edge.
            if to == file.module || file.module.is_empty() {
                continue;
            }
            if seen.insert((file.module.clone(), to.clone())) {
                edges.push(Edge {
                    from: file.module.clone(),
                    to,
                    at: format!("proxy/src/{}:{}", file.rel, reference.line),
                });
            }
        }
    }
    edges
}

fn name(module: &[String]) -> String {
    if module.is_empty() {
        "crate".to_owned()
    } else {
        module.join("::")
    }
}

/// The modules on one cycle of the graph, if it has any.
fn find_cycle(edges: &[Edge]) -> Option<Vec<String>> {
    let mut graph: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for edge in edges {
        graph
            .entry(name(&edge.from))
            .or_default()
            .insert(name(&edge.to));
        graph.entry(name(&edge.to)).or_default();
    }
    // 0 unvisited, 1 on the stack, 2 done.
    let mut state: BTreeMap<String, u8> = graph.keys().map(|k| (k.clone(), 0)).collect();
    fn visit(
        node: &str,
        graph: &BTreeMap<String, BTreeSet<String>>,
        state: &mut BTreeMap<String, u8>,
        stack: &mut Vec<String>,
    ) -> Option<Vec<String>> {
        state.insert(node.to_owned(), 1);
        stack.push(node.to_owned());
        for next in &graph[node] {
            match state[next.as_str()] {
                1 => {
                    let from = stack.iter().position(|n| n == next).expect("on the stack");
                    let mut cycle = stack[from..].to_vec();
                    cycle.push(next.clone());
                    return Some(cycle);
                }
                0 => {
                    if let Some(cycle) = visit(next, graph, state, stack) {
                        return Some(cycle);
                    }
                }
                _ => {}
            }
        }
        stack.pop();
        state.insert(node.to_owned(), 2);
        None
    }
    let nodes: Vec<String> = graph.keys().cloned().collect();
    for node in nodes {
        if state[node.as_str()] == 0 {
            if let Some(cycle) = visit(&node, &graph, &mut state, &mut Vec::new()) {
                return Some(cycle);
            }
        }
    }
    None
}

#[test]
fn no_crate_path_runs_up_a_layer() {
    let files = source_files();
    let folders: BTreeSet<String> = files
        .iter()
        .filter(|f| f.module.len() > 1 || f.rel.ends_with("/mod.rs"))
        .filter_map(|f| f.module.first().cloned())
        .collect();
    for folder in &folders {
        rank(folder);
    }
    let mut report = String::new();
    for edge in edges(&files) {
        let (from_layer, to_layer) = (layer_of(&edge.from, &folders), layer_of(&edge.to, &folders));
        if rank(&to_layer) <= rank(&from_layer) {
            continue;
        }
        let (from, to) = (name(&edge.from), name(&edge.to));
        let _ = writeln!(
            report,
            "{}: {from} ({from_layer}) -> {to} ({to_layer})",
            edge.at
        );
    }
    assert!(
        report.is_empty(),
        "crate paths that run up a layer (lowest first: {}):\n{report}",
        LAYERS.join(", ")
    );
}

#[test]
fn modules_import_each_other_in_no_cycle() {
    let files = source_files();
    let edges = edges(&files);
    if let Some(cycle) = find_cycle(&edges) {
        let mut hops = String::new();
        for pair in cycle.windows(2) {
            let edge = edges
                .iter()
                .find(|e| name(&e.from) == pair[0] && name(&e.to) == pair[1])
                .expect("an edge of the cycle");
            let _ = writeln!(hops, "  {}: {} -> {}", edge.at, pair[0], pair[1]);
        }
        panic!("modules import each other in a cycle:\n{hops}");
    }
}

/// Prints the module graph (`cargo test -p outrider-proxy --test layers -- --ignored --nocapture`).
#[test]
#[ignore = "prints the graph for a reader"]
fn print_graph() {
    for edge in edges(&source_files()) {
        println!("{} -> {}  ({})", name(&edge.from), name(&edge.to), edge.at);
    }
}

fn paths(src: &str, module: &[&str]) -> Vec<String> {
    let module: Vec<String> = module.iter().map(|s| (*s).to_owned()).collect();
    references(src, &module)
        .into_iter()
        .map(|r| r.path.join("::"))
        .collect()
}

#[test]
fn extracts_use_groups_nested_and_renamed() {
    let src = "use crate::{headers, tls::{self, Acceptor as A}, Shared};\nuse std::sync::Arc;";
    assert_eq!(
        paths(src, &["http", "server"]),
        ["headers", "tls", "tls::Acceptor", "Shared"]
    );
}

#[test]
fn extracts_inline_paths_and_their_lines() {
    let src = "fn f() {\n    let x = crate::metrics::Metrics::new();\n}";
    let refs = references(src, &[]);
    assert_eq!(refs.len(), 1);
    assert_eq!(refs[0].path.join("::"), "metrics::Metrics::new");
    assert_eq!(refs[0].line, 2);
}

#[test]
fn resolves_super_and_self_against_the_module_and_inline_modules() {
    let src = "use super::breaker::Outcome;\nuse self::x::Y;\n\
               mod tests {\n    use super::super::z::W;\n}\nuse super::q;";
    assert_eq!(
        paths(src, &["policy", "outlier"]),
        [
            "policy::breaker::Outcome",
            "policy::outlier::x::Y",
            "policy::z::W",
            "policy::q"
        ]
    );
}

#[test]
fn follows_a_used_module_by_its_name() {
    let src = "use crate::policy;\nfn f(p: policy::retry::RetryPolicy) {}\n\
               fn g() { other::policy::x(); }";
    assert_eq!(
        paths(src, &["io", "body"]),
        ["policy", "policy::retry::RetryPolicy"]
    );
}

#[test]
fn skips_comments_strings_chars_and_lifetimes() {
    let src = r##"
        // use crate::a;
        /* crate::b /* nested */ crate::c */
        /// [`crate::d`]
        const S: &str = "crate::e \" crate::f";
        const R: &str = r#"crate::g "still" inside"#;
        fn f<'a>(x: &'a str) -> char { let _ = b"crate::h"; '"' }
        use crate::i;
    "##;
    assert_eq!(paths(src, &[]), ["i"]);
}

#[test]
fn finds_a_cycle_and_names_it() {
    let edge = |from: &str, to: &str| Edge {
        from: vec![from.to_owned()],
        to: vec![to.to_owned()],
        at: String::new(),
    };
    assert_eq!(find_cycle(&[edge("a", "b"), edge("b", "c")]), None);
    assert_eq!(
        find_cycle(&[edge("a", "b"), edge("b", "c"), edge("c", "a")]),
        Some(vec![
            "a".to_owned(),
            "b".to_owned(),
            "c".to_owned(),
            "a".to_owned()
        ])
    );
}
