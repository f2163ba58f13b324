//! The documents rejected and not since accepted, as `status` shows them: part of the
//! durable state ([`crate::store::State`]), so every replica on etcd shows the same ones and a
//! restart keeps them.
//!
//! Bounded, since a peer chooses what it sends: each rejection's texts are cut to
//! [`MAX_TEXT`] bytes and its diagnostics to [`MAX_DIAGNOSTICS`], and the set keeps the
//! newest [`MAX_REJECTIONS`] within [`MAX_BYTES`] in all (the oldest go first). The whole set
//! travels with each write of the state's head, so the bound is also what a write costs.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::api::{ApiDiagnostic, Rejected};

/// Most rejections kept.
pub const MAX_REJECTIONS: usize = 50;
/// Most bytes of text kept over all rejections (an estimate of their encoded size).
pub const MAX_BYTES: usize = 256 * 1024;
/// Longest `message` or `rendered` text kept of one rejection.
pub const MAX_TEXT: usize = 4 * 1024;
/// Most diagnostics kept of one rejection.
pub const MAX_DIAGNOSTICS: usize = 16;
/// Longest path or message kept of one diagnostic.
const MAX_DIAGNOSTIC_TEXT: usize = 512;
/// Bytes counted per rejection and per diagnostic beyond their texts (field names, numbers).
const OVERHEAD: usize = 128;

/// The rejections in force, by document.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Rejections(BTreeMap<String, Rejected>);

impl Rejections {
    /// `document`'s rejection, if it has one.
    pub fn get(&self, document: &str) -> Option<&Rejected> {
        self.0.get(document)
    }

    /// The rejected documents, by name.
    pub fn documents(&self) -> impl Iterator<Item = &String> {
        self.0.keys()
    }

    /// Each rejected document and its rejection, by name.
    pub fn iter(&self) -> impl Iterator<Item = (&String, &Rejected)> {
        self.0.iter()
    }

    /// How many are kept.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether none is kept.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Forgets `document`'s rejection (it was accepted, or is gone); whether it had one.
    pub fn clear(&mut self, document: &str) -> bool {
        self.0.remove(document).is_some()
    }

    /// Keeps only the rejections `keep` says yes to.
    pub fn retain(&mut self, mut keep: impl FnMut(&str, &Rejected) -> bool) {
        self.0.retain(|name, r| keep(name, r));
    }

    /// Records `rejected` (cut to the bounds), replacing the document's earlier rejection,
    /// and forgets the oldest beyond the bounds. The same rejection again (a rejected file
    /// rescanned, the same text applied again) keeps the first one's time, so it changes
    /// nothing and costs no write of the store.
    pub fn record(&mut self, rejected: &Rejected) {
        let mut bounded = bounded(rejected);
        if let Some(earlier) = self.0.get(&bounded.document) {
            bounded.at_ms = earlier.at_ms;
            if *earlier == bounded {
                return;
            }
            bounded.at_ms = rejected.at_ms;
        }
        self.0.insert(bounded.document.clone(), bounded);
        self.enforce_bounds();
    }

    /// Forgets the oldest rejections (by time, then name) until the bounds hold: also for a
    /// set read from the store, written by another build.
    pub fn enforce_bounds(&mut self) {
        let mut total: usize = self.0.values().map(size).sum();
        while self.0.len() > MAX_REJECTIONS || total > MAX_BYTES {
            let Some(oldest) = self
                .0
                .iter()
                .min_by(|a, b| (a.1.at_ms, a.0).cmp(&(b.1.at_ms, b.0)))
                .map(|(name, _)| name.clone())
            else {
                break;
            };
            if let Some(gone) = self.0.remove(&oldest) {
                total = total.saturating_sub(size(&gone));
            }
        }
    }
}

/// The estimated encoded size of a rejection.
fn size(r: &Rejected) -> usize {
    let diagnostics: usize = r
        .diagnostics
        .iter()
        .map(|d| d.path.len() + d.message.len() + OVERHEAD)
        .sum();
    r.document.len() + r.message.len() + r.rendered.len() + diagnostics + OVERHEAD
}

/// `rejected` with its texts and diagnostics cut to the bounds.
fn bounded(rejected: &Rejected) -> Rejected {
    let mut diagnostics: Vec<ApiDiagnostic> = rejected
        .diagnostics
        .iter()
        .take(MAX_DIAGNOSTICS)
        .map(|d| ApiDiagnostic {
            path: cut(&d.path, MAX_DIAGNOSTIC_TEXT),
            message: cut(&d.message, MAX_DIAGNOSTIC_TEXT),
            line: d.line,
            column: d.column,
        })
        .collect();
    if rejected.diagnostics.len() > MAX_DIAGNOSTICS {
        diagnostics.push(ApiDiagnostic {
            path: String::new(),
            message: format!(
                "and {} more problems (not kept)",
                rejected.diagnostics.len() - MAX_DIAGNOSTICS
            ),
            line: None,
            column: None,
        });
    }
    Rejected {
        document: rejected.document.clone(),
        message: cut(&rejected.message, MAX_TEXT),
        rendered: cut(&rejected.rendered, MAX_TEXT),
        diagnostics,
        at_ms: rejected.at_ms,
        from_file: rejected.from_file,
    }
}

/// `text` cut to at most `max` bytes (on a character boundary), saying so.
fn cut(text: &str, max: usize) -> String {
    const MARK: &str = "… (cut)";
    if text.len() <= max {
        return text.to_string();
    }
    let mut end = max.saturating_sub(MARK.len());
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}{MARK}", &text[..end])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rejected(document: &str, at_ms: u64, text: usize) -> Rejected {
        Rejected {
            document: document.into(),
            message: "m".repeat(text),
            rendered: "r".repeat(text),
            diagnostics: (0..40)
                .map(|i| ApiDiagnostic {
                    path: format!("services.s{i}"),
                    message: "é".repeat(text),
                    line: Some(i),
                    column: Some(1),
                })
                .collect(),
            at_ms,
            from_file: false,
        }
    }

    #[test]
    fn a_rejection_is_cut_to_its_bounds() {
        let mut set = Rejections::default();
        set.record(&rejected("a", 1, 100_000));
        let kept = set.get("a").expect("kept");
        assert!(kept.message.len() <= MAX_TEXT && kept.message.ends_with("(cut)"));
        assert!(kept.rendered.len() <= MAX_TEXT);
        assert_eq!(kept.diagnostics.len(), MAX_DIAGNOSTICS + 1);
        assert!(kept.diagnostics[0].message.len() <= MAX_DIAGNOSTIC_TEXT);
        assert_eq!(
            kept.diagnostics[MAX_DIAGNOSTICS].message,
            "and 24 more problems (not kept)"
        );
        // A short one is kept as it is.
        let mut short = rejected("b", 2, 3);
        short.diagnostics.truncate(2);
        set.record(&short);
        assert_eq!(set.get("b"), Some(&short));
    }

    #[test]
    fn the_newest_are_kept_within_the_count_and_the_bytes() {
        let mut set = Rejections::default();
        for i in 0..(MAX_REJECTIONS as u64 + 10) {
            let mut r = rejected(&format!("d{i:03}"), 1000 + i, 10);
            r.diagnostics.clear();
            set.record(&r);
        }
        assert_eq!(set.len(), MAX_REJECTIONS);
        assert!(set.get("d009").is_none() && set.get("d010").is_some());
        // Large ones: the byte bound holds, and the newest stays.
        for i in 0..200u64 {
            set.record(&rejected(&format!("big{i:03}"), 5000 + i, 100_000));
            let total: usize = set.0.values().map(size).sum();
            assert!(total <= MAX_BYTES, "{total}");
            assert!(set.get(&format!("big{i:03}")).is_some());
        }
        // The same rejection again changes nothing; a new one replaces the document's old one.
        let before = set.clone();
        set.record(&rejected("big199", 9999, 100_000));
        assert_eq!(set, before);
        let before = set.len();
        set.record(&rejected("big199", 9999, 1));
        assert_eq!(set.len(), before);
        assert_eq!(set.get("big199").map(|r| r.at_ms), Some(9999));
    }
}
