//! The entry point of the fuzz target `policy_merge` in `fuzz/` (cargo-fuzz): policy documents
//! through the control plane's path, parse, validate, merge per workload, encode, and the
//! proxy's load of what would be pushed. It panics when an invariant breaks, so the fuzzer
//! reports it; the unit test below replays the committed corpus (`fuzz/corpus/policy_merge/`).
//!
//! Not part of the control plane's API: nothing in the server calls into this module.

use std::collections::BTreeSet;

use outrider_config::Policy;

use crate::merge;

/// Most documents taken from one input.
const MAX_DOCUMENTS: usize = 8;

/// Fuzz target `policy_merge`: UTF-8 text split at lines `---` into up to eight policy
/// documents (`d0` ... `d7`), each parsed and validated alone as `outriderctl apply` does, then
/// the valid ones merged for every workload they name and for the defaults (`"*"`).
///
/// Invariants: nothing panics; a valid document encodes to YAML that loads back to the same
/// policy; a merge that succeeds encodes, and when its encoding validates it loads back to the
/// same policy (what the proxy runs is what was merged); merging is deterministic.
pub fn policy_merge(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let mut docs: Vec<(String, Policy)> = Vec::new();
    for (i, part) in text.split("\n---\n").take(MAX_DOCUMENTS).enumerate() {
        let name = format!("d{i}");
        let Ok(loaded) = outrider_config::load(&name, part) else {
            // A Gateway API route or a policy attaching to one: the control plane's form,
            // which does not round-trip alone (composition consumes it).
            if let Ok(loaded) = outrider_config::load_document(&name, part) {
                docs.push((name, loaded.policy));
            }
            continue;
        };
        round_trips(&loaded.policy);
        docs.push((name, loaded.policy));
    }
    let mut workloads: BTreeSet<&str> = docs
        .iter()
        .filter_map(|(_, p)| p.workload.as_ref())
        .flat_map(|w| w.names().iter().map(String::as_str))
        .collect();
    workloads.insert(crate::engine::DEFAULTS);
    for workload in workloads {
        let merged = merge::merge(workload, docs.iter().map(|(n, p)| (n.as_str(), p)));
        let again = merge::merge(workload, docs.iter().map(|(n, p)| (n.as_str(), p)));
        assert_eq!(merged, again, "merge is not deterministic");
        let Ok(policy) = merged else { continue };
        assert!(
            policy.workload.is_none(),
            "a merged policy names a workload"
        );
        let yaml = outrider_config::to_yaml(&policy).expect("a merged policy encodes");
        // A merge may be invalid as a whole (the engine refuses it); if valid, it is exact.
        if let Ok(loaded) = outrider_config::load("merged", &yaml) {
            assert_eq!(
                loaded.policy, policy,
                "the merged policy changed in encoding:\n{yaml}"
            );
        }
    }
}

/// A valid policy encodes to YAML that loads back to itself.
fn round_trips(policy: &Policy) {
    let yaml = outrider_config::to_yaml(policy).expect("a valid policy encodes");
    match outrider_config::load("encoded", &yaml) {
        Ok(loaded) => assert_eq!(&loaded.policy, policy, "changed in encoding:\n{yaml}"),
        Err(error) => panic!("a valid policy encodes to an invalid one: {error}\n{yaml}"),
    }
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use super::*;

    #[test]
    fn the_committed_corpus_passes() {
        let dir: PathBuf = [
            env!("CARGO_MANIFEST_DIR"),
            "..",
            "fuzz",
            "corpus",
            "policy_merge",
        ]
        .iter()
        .collect();
        let mut count = 0;
        for entry in std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
            let path = entry.expect("corpus entry").path();
            policy_merge(&std::fs::read(&path).expect("corpus file"));
            count += 1;
        }
        assert!(count >= 5, "corpus missing");
    }
}
