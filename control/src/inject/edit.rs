//! Small edits of an ordered YAML mapping.

use super::*;

pub(super) fn s(text: &str) -> Value {
    Value::String(text.to_string())
}

/// Inserts `key: v` right before `before`.
pub(super) fn insert_before(m: &mut Mapping, before: &str, key: &str, v: Value) {
    let mut out = Mapping::with_capacity(m.len() + 1);
    for (k, old) in std::mem::take(m) {
        if k.as_str() == Some(before) {
            out.insert(s(key), v.clone());
        }
        out.insert(k, old);
    }
    if !out.contains_key(key) {
        out.insert(s(key), v);
    }
    *m = out;
}

pub(super) fn set(m: &mut Mapping, key: &str, v: Value) {
    m.insert(s(key), v);
}

pub(super) fn entry_map<'a>(m: &'a mut Mapping, key: &str) -> Result<&'a mut Mapping, String> {
    let slot = m.entry_or_insert_with(key, || Value::Mapping(Mapping::new()));
    if slot.is_null() {
        *slot = Value::Mapping(Mapping::new());
    }
    slot.as_mapping_mut()
        .ok_or_else(|| format!("`{key}` is not a mapping"))
}

pub(super) fn entry_seq<'a>(m: &'a mut Mapping, key: &str) -> Result<&'a mut Vec<Value>, String> {
    let slot = m.entry_or_insert_with(key, || Value::Sequence(Vec::new()));
    if slot.is_null() {
        *slot = Value::Sequence(Vec::new());
    }
    slot.as_sequence_mut()
        .ok_or_else(|| format!("`{key}` is not a list"))
}
