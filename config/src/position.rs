//! Where each value sits in the YAML text, so semantic errors found after deserialisation can
//! name a line and column. serde_yaml does not expose spans, so the text is walked once more
//! with yaml-rust2's event parser, which carries a marker on every event.

use std::collections::HashMap;

use yaml_rust2::parser::{Event, MarkedEventReceiver, Parser};
use yaml_rust2::scanner::Marker;

/// A 1-based line and column in the policy text.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Position {
    /// Line, from 1.
    pub line: usize,
    /// Column, from 1.
    pub column: usize,
}

/// Maps a value's path (`routes[1].split[0].weight`) to its position.
#[derive(Debug, Default)]
pub struct PositionIndex {
    positions: HashMap<String, Position>,
}

impl PositionIndex {
    /// Indexes `text`. Text that does not parse yields an empty index: serde_yaml reports the
    /// syntax error itself, with its own position.
    pub fn build(text: &str) -> Self {
        let mut walker = Walker::default();
        let mut parser = Parser::new_from_str(text);
        if parser.load(&mut walker, false).is_err() {
            return Self::default();
        }
        Self {
            positions: walker.positions,
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
}

enum Frame {
    /// `key` is the pending key and where it was written: a container value is reported at its
    /// key, since yaml-rust2 marks a block mapping's start after its first key.
    Mapping {
        key: Option<(String, Marker)>,
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
            Some(Frame::Mapping { key }) => match key.take() {
                None => None,
                Some((k, mark)) if parent.is_empty() => Some((k, Some(mark))),
                Some((k, mark)) => Some((format!("{parent}.{k}"), Some(mark))),
            },
        }
    }

    fn record(&mut self, path: &str, mark: Marker) {
        self.positions.entry(path.to_string()).or_insert(Position {
            line: mark.line(),
            column: mark.col() + 1,
        });
    }
}

impl MarkedEventReceiver for Walker {
    fn on_event(&mut self, ev: Event, mark: Marker) {
        match ev {
            Event::Scalar(value, ..) => match self.next_node_path() {
                Some((path, _)) => self.record(&path, mark),
                None => {
                    if let Some(Frame::Mapping { key }) = self.stack.last_mut() {
                        *key = Some((value, mark));
                    }
                }
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
                    Frame::Mapping { key: None }
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
