//! Consistent hashing for `load_balancing: { hash: ... }`: a Maglev lookup table built once per
//! endpoint set (policy load, DNS change), and the key of a request (a header's or a cookie's
//! value) hashed with a fixed, seedless function so that every proxy sends a key to the same
//! endpoint.
//!
//! Why Maglev (Eisenbud et al., NSDI 2016) rather than a ring with virtual nodes: a lookup is
//! one modulo and one array read whatever the number of endpoints (a ring is a binary search);
//! every endpoint owns within one slot of `M / N` of the table (a ring of 100 points per
//! endpoint is off by about 10%); and when one of N endpoints leaves, its keys (1/N of them)
//! move and only about 0.1% of the others do with `M` = 65537 (a ring moves none of the others).

use http::header::{HeaderMap, HeaderName, COOKIE};

/// The lookup table's size: a prime (every skip is then coprime with it), Envoy's default. Each
/// endpoint owns `M / N` slots give or take one, and few keys of the endpoints that stay move
/// when another leaves as long as `N` is much smaller than `M`.
pub const TABLE_SIZE: usize = 65537;

/// Slots looked at past a key's own when its endpoint cannot take the request (ejected, held
/// out, or just failed the attempt before): slots drawn from the key's hash (the same ones
/// every time), so an unusable endpoint's keys spread over the others in proportion to their
/// share, and each key always lands on the same one. Neighbouring slots would not do: Maglev
/// fills the table in runs, and the next slot's endpoint is far from uniform (measured: one
/// heir took 36% of a removed endpoint's keys, another 19%).
pub const PROBE_SLOTS: usize = 256;

/// 64-bit FNV-1a, then MurmurHash3's 64-bit finaliser so that keys differing in one byte land
/// far apart. Fixed constants and no seed: every proxy, of every build, computes the same value.
pub fn key_hash(bytes: &[u8]) -> u64 {
    const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
    const FNV_PRIME: u64 = 0x0000_0100_0000_01b3;
    let mut hash = FNV_OFFSET;
    for &byte in bytes {
        hash ^= u64::from(byte);
        hash = hash.wrapping_mul(FNV_PRIME);
    }
    mix(hash)
}

/// MurmurHash3's `fmix64`.
fn mix(mut h: u64) -> u64 {
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
    h ^= h >> 33;
    h = h.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    h ^ (h >> 33)
}

/// Where a request's hash key is read, compiled from the policy once per load.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HashKey {
    /// A header's value (the first field line of that name).
    Header(HeaderName),
    /// A cookie's value, by name.
    Cookie(Box<str>),
}

impl HashKey {
    /// Compiles the policy's setting; `None` for a header name `http` refuses (validation
    /// refuses it first).
    pub fn compile(on: &outrider_config::HashOn) -> Option<Self> {
        match on {
            outrider_config::HashOn::Header(name) => HeaderName::from_bytes(name.as_bytes())
                .ok()
                .map(Self::Header),
            outrider_config::HashOn::Cookie(name) => Some(Self::Cookie(name.as_str().into())),
        }
    }

    /// The hash of the request's key, or `None` when it carries none (it is then balanced round
    /// robin). Reads the headers in place: nothing is allocated.
    pub fn of(&self, headers: &HeaderMap) -> Option<u64> {
        match self {
            Self::Header(name) => headers.get(name).map(|value| key_hash(value.as_bytes())),
            Self::Cookie(name) => headers
                .get_all(COOKIE)
                .iter()
                .find_map(|line| cookie(line.as_bytes(), name.as_bytes()))
                .map(key_hash),
        }
    }
}

/// The value of cookie `name` in one `Cookie` field line (`a=1; b=2`, RFC 6265 §4.2.1), the
/// first when repeated; surrounding double quotes are part of the value, as the RFC has it.
fn cookie<'a>(line: &'a [u8], name: &[u8]) -> Option<&'a [u8]> {
    line.split(|&b| b == b';').find_map(|pair| {
        let pair = pair.trim_ascii();
        let at = pair.iter().position(|&b| b == b'=')?;
        let (key, value) = pair.split_at(at);
        (key.trim_ascii() == name).then(|| value.get(1..).unwrap_or_default().trim_ascii())
    })
}

/// A Maglev lookup table: [`TABLE_SIZE`] slots, each the index of an endpoint in the list it
/// was built from.
pub struct Maglev {
    slots: Box<[u32]>,
}

impl Maglev {
    /// The table for endpoints named by `names` (their addresses, say), by index. It depends on
    /// the set of names only, not on their order, so proxies listing the same endpoints in
    /// another order agree. `None` for an empty set.
    pub fn build<N: AsRef<[u8]>>(names: &[N]) -> Option<Self> {
        let m = TABLE_SIZE as u64;
        // Each endpoint's permutation of the slots: `offset + j * skip (mod M)`; filled in
        // turns in the order of the names' hashes, so the list's order does not matter.
        let mut order: Vec<(u64, u32)> = names
            .iter()
            .zip(0u32..)
            .map(|(name, index)| (key_hash(name.as_ref()), index))
            .collect();
        order.sort_unstable();
        if order.is_empty() {
            return None;
        }
        let mut turns: Vec<(u64, u64, u32)> = order
            .iter()
            .map(|&(hash, index)| {
                let offset = mix(hash ^ 0x6d61_676c_6576_6f66) % m;
                let skip = mix(hash ^ 0x6d61_676c_6576_736b) % (m - 1) + 1;
                (offset, skip, index)
            })
            .collect();
        let mut slots = vec![u32::MAX; TABLE_SIZE].into_boxed_slice();
        let mut filled = 0;
        // Every turn fills one slot; a permutation visits each slot once, so each search ends.
        'fill: loop {
            for (next, skip, index) in &mut turns {
                let mut slot = *next;
                while slots[slot as usize] != u32::MAX {
                    slot = (slot + *skip) % m;
                }
                slots[slot as usize] = *index;
                *next = (slot + *skip) % m;
                filled += 1;
                if filled == TABLE_SIZE {
                    break 'fill;
                }
            }
        }
        Some(Self { slots })
    }

    /// The slots of `hash` in the order they are tried, as endpoint indices: its own, then
    /// [`PROBE_SLOTS`] more drawn from the hash.
    pub fn candidates(&self, hash: u64) -> impl Iterator<Item = usize> + '_ {
        (0..=PROBE_SLOTS as u64).map(move |k| {
            let slot = if k == 0 { hash } else { mix(hash ^ k) };
            self.slots[(slot % TABLE_SIZE as u64) as usize] as usize
        })
    }

    /// The endpoint index of `hash`.
    pub fn lookup(&self, hash: u64) -> usize {
        self.slots[(hash % TABLE_SIZE as u64) as usize] as usize
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    fn names(ports: impl IntoIterator<Item = u16>) -> Vec<String> {
        ports
            .into_iter()
            .map(|port| format!("10.0.0.{}:{port}", port % 7))
            .collect()
    }

    fn keys() -> impl Iterator<Item = u64> {
        (0..20_000).map(|i| key_hash(format!("user-{i}").as_bytes()))
    }

    #[test]
    fn the_hash_is_fixed() {
        // Pinned: a change here sends every user to another endpoint on upgrade.
        assert_eq!(key_hash(b""), 0xefd0_1f60_ba99_2926);
        assert_eq!(key_hash(b"user-1"), 0x41a2_fca5_c684_01c5);
        assert_ne!(key_hash(b"user-1"), key_hash(b"user-2"));
    }

    #[test]
    fn endpoints_share_the_keys_evenly() {
        let endpoints = names(8000..8005);
        let table = Maglev::build(&endpoints).expect("table");
        let mut slots = HashMap::new();
        for &slot in table.slots.iter() {
            *slots.entry(slot).or_insert(0usize) += 1;
        }
        // Maglev's own bound: every endpoint owns M/N slots give or take one.
        for owned in slots.values() {
            assert!(owned.abs_diff(TABLE_SIZE / 5) <= 1, "{slots:?}");
        }
        let mut users = HashMap::new();
        for key in keys() {
            *users.entry(table.lookup(key)).or_insert(0usize) += 1;
        }
        // 20,000 keys, 4,000 each expected; binomial sd about 57: 5% is about 3.5 sd.
        for (endpoint, count) in &users {
            assert!(count.abs_diff(4_000) <= 200, "{endpoint}: {users:?}");
        }
    }

    #[test]
    fn removing_one_of_five_endpoints_moves_its_keys_and_few_others() {
        let before = names(8000..8005);
        let after: Vec<String> = before
            .iter()
            .filter(|n| !n.ends_with(":8002"))
            .cloned()
            .collect();
        let (table_before, table_after) = (
            Maglev::build(&before).expect("table"),
            Maglev::build(&after).expect("table"),
        );
        let (mut moved, mut moved_elsewhere, total) = (0, 0, keys().count());
        for key in keys() {
            let was = &before[table_before.lookup(key)];
            let is = &after[table_after.lookup(key)];
            if was != is {
                moved += 1;
                if !was.ends_with(":8002") {
                    moved_elsewhere += 1;
                }
            }
        }
        // The removed endpoint's fifth (4,000 give or take 200) must move; of the others'
        // 16,000 keys Maglev moves about 0.1%: at most 1% allowed.
        assert!(moved <= total / 5 + 200, "{moved} of {total} moved");
        assert!(
            moved_elsewhere <= 160,
            "{moved_elsewhere} keys of staying endpoints moved"
        );
        // The order the endpoints are listed in does not matter.
        let mut reversed = before.clone();
        reversed.reverse();
        let table_reversed = Maglev::build(&reversed).expect("table");
        for key in keys().take(1000) {
            assert_eq!(
                before[table_before.lookup(key)],
                reversed[table_reversed.lookup(key)]
            );
        }
    }

    #[test]
    fn the_probe_order_covers_every_endpoint_and_spreads_an_unusable_ones_keys() {
        let endpoints = names(8000..8005);
        let table = Maglev::build(&endpoints).expect("table");
        let mut heirs = HashMap::new();
        for key in keys() {
            let mut candidates = table.candidates(key);
            if candidates.next() != Some(2) {
                continue;
            }
            // The first other endpoint in the probe order takes the key while 2 is out.
            let heir = candidates.find(|&i| i != 2).expect("another endpoint");
            *heirs.entry(heir).or_insert(0usize) += 1;
        }
        assert_eq!(heirs.len(), 4, "{heirs:?}");
        for count in heirs.values() {
            // About 1,000 each of about 4,000.
            assert!(count.abs_diff(1_000) <= 200, "{heirs:?}");
        }
    }

    #[test]
    fn keys_come_from_a_header_or_a_cookie() {
        let mut headers = HeaderMap::new();
        headers.insert("x-user-id", "alice".parse().expect("value"));
        headers.append(COOKIE, "theme=dark; session= s1 ".parse().expect("value"));
        headers.append(COOKIE, "session=s2".parse().expect("value"));
        let header = HashKey::compile(&outrider_config::HashOn::Header("X-User-Id".into()));
        let header = header.expect("key");
        assert_eq!(header.of(&headers), Some(key_hash(b"alice")));
        let session = HashKey::Cookie("session".into());
        assert_eq!(session.of(&headers), Some(key_hash(b"s1")));
        assert_eq!(HashKey::Cookie("sess".into()).of(&headers), None);
        assert_eq!(
            HashKey::Cookie("theme".into()).of(&headers),
            Some(key_hash(b"dark"))
        );
        assert_eq!(
            HashKey::Header(HeaderName::from_static("x-other")).of(&headers),
            None
        );
        assert!(Maglev::build::<&str>(&[]).is_none());
    }
}
