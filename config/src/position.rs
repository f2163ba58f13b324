//! Where each value sits in the YAML text, so semantic errors found after deserialisation can
//! name a line and column, and a duplicate key can name both of its places. serde-saphyr
//! deserialises without exposing a span per path, so when (and only when) there is something
//! to report, the text is walked again with the event parser serde-saphyr itself runs on
//! (granit-parser, which it re-exports): same grammar, same positions. A valid policy is
//! parsed once.

use std::collections::HashMap;

use serde_saphyr::granit_parser::{Event, Marker, Parser};

use crate::limits::MAX_DEPTH;

/// A 1-based line and column in the policy text.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Position {
    /// Line, from 1.
    pub line: usize,
    /// Column, from 1.
    pub column: usize,
}

impl Position {
    fn at(mark: Marker) -> Self {
        Self {
            line: mark.line(),
            column: mark.col() + 1,
        }
    }
}

/// A key written twice in one mapping.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DuplicateKey {
    /// The path of the key (`services.payments`).
    pub path: String,
    /// Where it was first written.
    pub first: Position,
    /// Where it was written again.
    pub second: Position,
}

/// Maps a value's path (`routes[1].split[0].weight`) to its position.
#[derive(Debug, Default)]
pub struct PositionIndex {
    positions: HashMap<String, Position>,
    paths: HashMap<Position, String>,
    duplicates: Vec<DuplicateKey>,
}

impl PositionIndex {
    /// Indexes `text`. The walk stops at the first syntax error (or past the depth budget);
    /// what was indexed until then is kept, and the deserialiser reports the error itself.
    pub fn build(text: &str) -> Self {
        let mut walker = Walker::default();
        for event in Parser::new_from_str(text) {
            let Ok((event, span)) = event else { break };
            if walker.stack.len() > MAX_DEPTH {
                break;
            }
            walker.on_event(event, span.start);
        }
        Self {
            positions: walker.positions,
            paths: walker.paths_at,
            duplicates: walker.duplicates,
        }
    }

    /// The position of `path`, or of its nearest indexed ancestor.
    pub fn find(&self, path: &str) -> Option<Position> {
        let mut p = path;
        loop {
            if let Some(pos) = self.positions.get(p) {
                return Some(*pos);
            }
            let cut = p.rfind(['.', '['])?;
            p = &p[..cut];
        }
    }

    /// The path of the key or value written at `position`, if one starts there: names the
    /// value a deserialisation error points at.
    pub fn path_at(&self, position: Position) -> Option<&str> {
        self.paths.get(&position).map(String::as_str)
    }

    /// Keys written twice in the same mapping, in file order of their second writing.
    pub fn duplicates(&self) -> &[DuplicateKey] {
        &self.duplicates
    }
}

enum Frame {
    /// `key` is the pending key and where it was written: a container value is reported at its
    /// key, since the parser marks a block mapping's start after its first key. `seen` holds
    /// every key of the mapping so far, to catch duplicates.
    Mapping {
        key: Option<(String, Marker)>,
        seen: HashMap<String, Position>,
    },
    Sequence {
        index: usize,
    },
}

#[derive(Default)]
struct Walker {
    stack: Vec<Frame>,
    /// The path of each open container, parallel to `stack`.
    paths: Vec<String>,
    positions: HashMap<String, Position>,
    /// The path of every key and value, by where it starts.
    paths_at: HashMap<Position, String>,
    duplicates: Vec<DuplicateKey>,
}

impl Walker {
    /// The path of the node that starts now and the mark of its key (if it is a mapping value),
    /// or `None` if the node is itself a mapping key.
    fn next_node_path(&mut self) -> Option<(String, Option<Marker>)> {
        let parent = self.paths.last().map(String::as_str).unwrap_or_default();
        match self.stack.last_mut() {
            None => Some((String::new(), None)),
            Some(Frame::Sequence { index }) => {
                let path = format!("{parent}[{index}]");
                *index += 1;
                Some((path, None))
            }
            Some(Frame::Mapping { key, .. }) => match key.take() {
                None => None,
                Some((k, mark)) if parent.is_empty() => Some((k, Some(mark))),
                Some((k, mark)) => Some((format!("{parent}.{k}"), Some(mark))),
            },
        }
    }

    fn record(&mut self, path: &str, mark: Marker) {
        self.positions
            .entry(path.to_string())
            .or_insert(Position::at(mark));
        self.paths_at
            .entry(Position::at(mark))
            .or_insert_with(|| path.to_string());
    }

    /// A scalar key was read: remember it, and whether the mapping already had it.
    fn on_key(&mut self, value: String, mark: Marker) {
        let parent = self.paths.last().map(String::as_str).unwrap_or_default();
        let Some(Frame::Mapping { key, seen }) = self.stack.last_mut() else {
            return;
        };
        let here = Position::at(mark);
        let path = if parent.is_empty() {
            value.clone()
        } else {
            format!("{parent}.{value}")
        };
        if let Some(first) = seen.get(&value) {
            self.duplicates.push(DuplicateKey {
                path: path.clone(),
                first: *first,
                second: here,
            });
        } else {
            seen.insert(value.clone(), here);
        }
        *key = Some((value, mark));
        self.paths_at.entry(here).or_insert(path);
    }

    fn on_event(&mut self, ev: Event<'_>, mark: Marker) {
        match ev {
            Event::Scalar(value, ..) => match self.next_node_path() {
                Some((path, _)) => self.record(&path, mark),
                None => self.on_key(value.into_owned(), mark),
            },
            Event::MappingStart(..) | Event::SequenceStart(..) => {
                // A container used as a mapping key is not something a policy does; give it a
                // placeholder so the walk stays balanced.
                let (path, key_mark) = self
                    .next_node_path()
                    .unwrap_or_else(|| ("?".to_string(), None));
                self.record(&path, key_mark.unwrap_or(mark));
                self.paths.push(path);
                self.stack.push(if matches!(ev, Event::MappingStart(..)) {
                    Frame::Mapping {
                        key: None,
                        seen: HashMap::new(),
                    }
                } else {
                    Frame::Sequence { index: 0 }
                });
            }
            Event::MappingEnd | Event::SequenceEnd => {
                self.stack.pop();
                self.paths.pop();
            }
            Event::Alias(_) => {
                if let Some((path, _)) = self.next_node_path() {
                    self.record(&path, mark);
                }
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn indexes_nested_paths() {
        let text = "services:\n  a:\n    endpoints: [127.0.0.1:1]\nroutes:\n  - match: { authority: a }\n    split:\n      - service: a\n        weight: 0\n";
        let idx = PositionIndex::build(text);
        assert_eq!(
            idx.find("routes[0].split[0].weight"),
            Some(Position {
                line: 8,
                column: 17
            })
        );
        assert_eq!(
            idx.find("services.a.endpoints[0]"),
            Some(Position {
                line: 3,
                column: 17
            })
        );
        // Unknown leaf falls back to the nearest ancestor.
        assert_eq!(
            idx.find("services.a.nothing"),
            Some(Position { line: 2, column: 3 })
        );
    }
}
