//! The JSON Schema and the validator agree: every example and test policy in the repository is
//! accepted by both [`outrider_config::load`] and a JSON Schema validator (the `jsonschema`
//! crate, independent of `schemars`) reading `policy_schema()`; every document in
//! `tests/schema/invalid/` is rejected by both; every one in `tests/schema/validator-only/`
//! is rejected by the validator while the schema, which cannot say it (a reference to a
//! service, two fields that exclude each other, a duration of zero), accepts it. A document
//! of that last kind the schema starts rejecting belongs in `invalid/`: the test says so.
//!
//! YAML is read into JSON with serde-saphyr, the policy parser's own YAML reader, so that both
//! see the same scalars.

use std::path::{Path, PathBuf};

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn validator() -> jsonschema::Validator {
    jsonschema::draft7::new(&outrider_config::policy_schema())
        .unwrap_or_else(|e| panic!("the generated schema is not a valid draft-07 schema: {e}"))
}

/// The `.yaml` files of `dir` (relative to the repository), sorted.
fn yaml_files(dir: &str) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(repo().join(dir))
        .unwrap_or_else(|e| panic!("{dir}: {e}"))
        .map(|entry| entry.expect("directory entry").path())
        .filter(|path| path.extension().is_some_and(|ext| ext == "yaml"))
        .collect();
    files.sort();
    assert!(!files.is_empty(), "no .yaml file in {dir}");
    files
}

/// The documents of a file (`---` separates them in the merge corpus), each with its name.
fn documents(path: &Path) -> Vec<(String, String)> {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{path:?}: {e}"));
    let name = path
        .strip_prefix(repo())
        .unwrap_or(path)
        .display()
        .to_string();
    let parts: Vec<&str> = text.split("\n---\n").collect();
    if parts.len() == 1 {
        return vec![(name, text)];
    }
    parts
        .into_iter()
        .enumerate()
        .map(|(i, part)| (format!("{name} (document {})", i + 1), part.to_string()))
        .collect()
}

/// The schema's verdict: `Err` with every error it reports.
fn schema_check(validator: &jsonschema::Validator, text: &str) -> Result<(), Vec<String>> {
    let value: serde_json::Value = match serde_saphyr::from_str(text) {
        Ok(value) => value,
        Err(e) => return Err(vec![format!("not YAML that maps to JSON: {e}")]),
    };
    let errors: Vec<String> = validator
        .iter_errors(&value)
        .map(|e| format!("{} at {}", e, e.instance_path()))
        .collect();
    if errors.is_empty() {
        Ok(())
    } else {
        Err(errors)
    }
}

/// Every policy file kept in the repository as an example, a deployment or a test input.
fn policy_files() -> Vec<PathBuf> {
    let mut files = vec![
        repo().join("deploy/examples/demo.yaml"),
        repo().join("control/tests/fixtures/inject/policy.yaml"),
    ];
    for dir in [
        "deploy/kubernetes/policies",
        "fuzz/corpus/snapshot",
        "fuzz/corpus/policy_merge",
        "config/tests/schema/valid",
    ] {
        files.extend(yaml_files(dir));
    }
    files
}

#[test]
fn every_policy_in_the_repository_is_valid_to_both() {
    let validator = validator();
    let mut failures = Vec::new();
    let mut checked = 0;
    for path in policy_files() {
        let documents = documents(&path);
        // A file with Gateway API documents is one the control plane composes: it is read
        // whole (its route entries may attach policy to the translated routes), and the
        // Kubernetes documents in it are not policy, so the policy schema is not theirs.
        let composed = documents
            .iter()
            .any(|(_, text)| outrider_config::gateway::is_kubernetes_document(text));
        if composed {
            let whole = std::fs::read_to_string(&path).expect("read the file");
            if let Err(e) = outrider_config::load_document(&path.display().to_string(), &whole) {
                failures.push(format!(
                    "{}: the control plane rejects it:\n{e}",
                    path.display()
                ));
            }
        }
        for (name, text) in documents {
            if composed && outrider_config::gateway::is_kubernetes_document(&text) {
                continue;
            }
            checked += 1;
            if !composed {
                if let Err(e) = outrider_config::load(&name, &text) {
                    failures.push(format!("{name}: the validator rejects it:\n{e}"));
                }
            }
            if let Err(errors) = schema_check(&validator, &text) {
                failures.push(format!(
                    "{name}: the schema rejects it:\n  {}",
                    errors.join("\n  ")
                ));
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    assert!(checked >= 20, "only {checked} documents checked");
}

#[test]
fn every_invalid_document_is_rejected_by_both() {
    let validator = validator();
    let mut failures = Vec::new();
    for path in yaml_files("config/tests/schema/invalid") {
        for (name, text) in documents(&path) {
            if let Ok(loaded) = outrider_config::load(&name, &text) {
                failures.push(format!("{name}: the validator accepts it: {loaded:?}"));
            }
            if schema_check(&validator, &text).is_ok() {
                failures.push(format!("{name}: the schema accepts it"));
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn validator_only_documents_are_rejected_by_the_validator_alone() {
    let validator = validator();
    let mut failures = Vec::new();
    for path in yaml_files("config/tests/schema/validator-only") {
        for (name, text) in documents(&path) {
            if let Ok(loaded) = outrider_config::load(&name, &text) {
                failures.push(format!("{name}: the validator accepts it: {loaded:?}"));
            }
            if let Err(errors) = schema_check(&validator, &text) {
                failures.push(format!(
                    "{name}: the schema rejects it now; move it to tests/schema/invalid/:\n  {}",
                    errors.join("\n  ")
                ));
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// The example and deployment policies point editors at the schema, by a path that exists.
#[test]
fn every_example_names_the_schema_for_editors() {
    const PREFIX: &str = "# yaml-language-server: $schema=";
    let mut files = vec![
        repo().join("deploy/examples/demo.yaml"),
        repo().join("control/tests/fixtures/inject/policy.yaml"),
    ];
    files.extend(yaml_files("deploy/kubernetes/policies"));
    files.extend(yaml_files("config/tests/schema/valid"));
    for path in files {
        let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path:?}: {e}"));
        let first = text.lines().next().unwrap_or_default();
        let target = first
            .strip_prefix(PREFIX)
            .unwrap_or_else(|| panic!("{path:?}: the first line is not `{PREFIX}...`"));
        let schema = path.parent().expect("a file's directory").join(target);
        let same = std::fs::canonicalize(&schema)
            .ok()
            .zip(std::fs::canonicalize(repo().join("deploy/schema/policy.json")).ok())
            .is_some_and(|(a, b)| a == b);
        assert!(
            same,
            "{path:?}: `{target}` is not deploy/schema/policy.json"
        );
    }
}

/// A validator for one definition of the policy schema (`Duration`, `ByteSize`, ...).
fn definition(name: &str) -> jsonschema::Validator {
    let schema = outrider_config::policy_schema();
    let wrapped = serde_json::json!({
        "$schema": schema["$schema"],
        "definitions": schema["definitions"],
        "$ref": format!("#/definitions/{name}"),
    });
    jsonschema::draft7::new(&wrapped).unwrap_or_else(|e| panic!("{name}: {e}"))
}

/// The scalar types' patterns say what their parsers say, string by string.
#[test]
fn scalar_patterns_agree_with_their_parsers() {
    type Parse = fn(&str) -> bool;
    let cases: [(&str, Parse, &[&str]); 3] = [
        (
            "Duration",
            |s| s.parse::<outrider_config::Duration>().is_ok(),
            &[
                "250ms", "2s", "1m", "1h", "1m30s", "500us", "0s", " 2s ", "", "5", "5d", "s",
                "1.5s", "-1s", "2 s", "1m 30s", "ms", "2S",
            ],
        ),
        (
            "ByteSize",
            |s| s.parse::<outrider_config::ByteSize>().is_ok(),
            &[
                "64KiB",
                "1MiB",
                "1GiB",
                "10KB",
                "10kB",
                "1MB",
                "1GB",
                "512",
                "512B",
                "1 MiB",
                "",
                "KiB",
                "5 parsecs",
                "1.5MiB",
                "-1",
                "1kib",
                "1TiB",
            ],
        ),
        (
            "SocketAddr",
            |s| s.parse::<std::net::SocketAddr>().is_ok(),
            &[
                "127.0.0.1:8080",
                "0.0.0.0:0",
                "255.255.255.255:65535",
                "[::1]:8080",
                "[::]:1",
                "[fe80::1%eth0]:80",
                "[fe80::1%2]:80",
                "[::ffff:10.0.0.1]:443",
                "127.0.0.1:65536",
                "256.0.0.1:80",
                "01.2.3.4:80",
                "127.0.0.1",
                "localhost:80",
                "::1:80",
                "127.0.0.1:-1",
                "[::1]",
                "1.2.3:80",
                "127.0.0.1:080",
                "127.0.0.1:0065535",
            ],
        ),
    ];
    let mut disagreements = Vec::new();
    for (name, parses, samples) in cases {
        let schema = definition(name);
        for sample in samples {
            let by_parser = parses(sample);
            let by_schema = schema.is_valid(&serde_json::json!(sample));
            if by_parser != by_schema {
                disagreements.push(format!(
                    "{name} `{sample}`: the parser says {by_parser}, the schema {by_schema}"
                ));
            }
        }
    }
    assert!(disagreements.is_empty(), "{}", disagreements.join("\n"));
}
