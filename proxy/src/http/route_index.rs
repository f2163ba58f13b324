//! Which entries of the route table can take a request to a given host, built once per policy
//! load: the entries naming that authority, and those naming none. Selection tests only them,
//! in table (precedence) order, so a policy's routes for other hosts cost a request nothing
//! but one hash lookup. The order is the table's, so the route picked is the one a walk over
//! the whole table would pick (tested against that walk in `snapshot.rs`).

use std::borrow::Cow;
use std::collections::HashMap;

/// Table positions by authority (lowercase), and those of the entries without one; each list
/// in increasing position.
#[derive(Debug, Default)]
pub(crate) struct RouteIndex {
    by_host: HashMap<Box<str>, Box<[u32]>>,
    any_host: Box<[u32]>,
}

impl RouteIndex {
    /// The index of a table whose entries name `authorities`, in table order. A table beyond
    /// `u32::MAX` entries (no policy comes near: a route has at most 64 matches) is cut there.
    pub(crate) fn new<'a>(authorities: impl IntoIterator<Item = Option<&'a str>>) -> Self {
        let mut by_host: HashMap<Box<str>, Vec<u32>> = HashMap::new();
        let mut any_host = Vec::new();
        for (position, authority) in (0..=u32::MAX).zip(authorities) {
            match authority {
                Some(host) => by_host
                    .entry(host.to_ascii_lowercase().into_boxed_str())
                    .or_default()
                    .push(position),
                None => any_host.push(position),
            }
        }
        Self {
            by_host: by_host
                .into_iter()
                .map(|(host, positions)| (host, positions.into_boxed_slice()))
                .collect(),
            any_host: any_host.into_boxed_slice(),
        }
    }

    /// The positions of the entries naming `host` (compared without case).
    pub(crate) fn naming(&self, host: &str) -> &[u32] {
        // Hosts arrive lowercase nearly always: no allocation then.
        let host = if host.bytes().any(|b| b.is_ascii_uppercase()) {
            Cow::Owned(host.to_ascii_lowercase())
        } else {
            Cow::Borrowed(host)
        };
        self.by_host.get(&*host).map_or(&[], |p| &p[..])
    }

    /// The positions that may take a request to `host`, in increasing order: the two lists
    /// merged.
    pub(crate) fn candidates<'s>(&'s self, host: &str) -> impl Iterator<Item = usize> + 's {
        Merge {
            a: self.naming(host),
            b: &self.any_host,
        }
    }
}

/// Two increasing lists of positions, walked as one.
struct Merge<'s> {
    a: &'s [u32],
    b: &'s [u32],
}

impl Iterator for Merge<'_> {
    type Item = usize;

    fn next(&mut self) -> Option<usize> {
        let take_a = match (self.a.first(), self.b.first()) {
            (Some(a), Some(b)) => a < b,
            (Some(_), None) => true,
            (None, Some(_)) => false,
            (None, None) => return None,
        };
        let list = if take_a { &mut self.a } else { &mut self.b };
        let (first, rest) = list.split_first()?;
        *list = rest;
        usize::try_from(*first).ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn candidates_are_a_hosts_entries_and_the_hostless_in_table_order() {
        let index = RouteIndex::new([Some("a"), None, Some("B"), Some("a"), None]);
        let of = |host| index.candidates(host).collect::<Vec<_>>();
        assert_eq!(of("a"), [0, 1, 3, 4]);
        assert_eq!(of("A"), [0, 1, 3, 4]);
        assert_eq!(of("b"), [1, 2, 4]);
        assert_eq!(of("other"), [1, 4]);
        assert_eq!(index.naming("b"), [2]);
    }
}
