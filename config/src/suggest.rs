//! "Did you mean" for misspelt names: the closest candidate by edit distance, when it is
//! close enough to be the likely intent.

/// The candidate closest to `word` (optimal string alignment distance: insertions,
/// deletions, substitutions and swaps of neighbours each cost 1), if it is within a third of
/// `word`'s length (at least 1, at most 3) and `word` is not itself a candidate. A tie is no
/// suggestion: `http3` is as near `http1` as `http2`.
pub fn did_you_mean<'a, I>(word: &str, candidates: I) -> Option<&'a str>
where
    I: IntoIterator<Item = &'a str>,
{
    let word: Vec<char> = word.chars().collect();
    // Past this length a name is not a typo of a schema field, and the table grows as the
    // product of the two lengths.
    if word.is_empty() || word.len() > 64 {
        return None;
    }
    let limit = (word.len() / 3).clamp(1, 3);
    let mut best: Option<(usize, &str)> = None;
    let mut tied = false;
    for candidate in candidates {
        let chars: Vec<char> = candidate.chars().collect();
        if chars == word {
            return None;
        }
        if chars.len().abs_diff(word.len()) > limit || chars.len() > 64 {
            continue;
        }
        let distance = distance(&word, &chars);
        if distance > limit {
            continue;
        }
        match best {
            Some((d, _)) if d < distance => {}
            Some((d, _)) if d == distance => tied = true,
            _ => {
                best = Some((distance, candidate));
                tied = false;
            }
        }
    }
    if tied {
        return None;
    }
    best.map(|(_, candidate)| candidate)
}

/// Optimal string alignment distance between `a` and `b`.
fn distance(a: &[char], b: &[char]) -> usize {
    // Three rows: the one before the previous is needed for swaps.
    let mut before: Vec<usize> = vec![0; b.len() + 1];
    let mut previous: Vec<usize> = (0..=b.len()).collect();
    let mut current = vec![0; b.len() + 1];
    for i in 1..=a.len() {
        current[0] = i;
        for j in 1..=b.len() {
            let cost = usize::from(a[i - 1] != b[j - 1]);
            let mut d = (previous[j] + 1)
                .min(current[j - 1] + 1)
                .min(previous[j - 1] + cost);
            if i > 1 && j > 1 && a[i - 1] == b[j - 2] && a[i - 2] == b[j - 1] {
                d = d.min(before[j - 2] + 1);
            }
            current[j] = d;
        }
        std::mem::swap(&mut before, &mut previous);
        std::mem::swap(&mut previous, &mut current);
    }
    previous[b.len()]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn suggests_the_closest_close_name() {
        let fields = ["endpoints", "dns", "listen", "protocol", "timeouts"];
        assert_eq!(did_you_mean("endpiont", fields), Some("endpoints"));
        assert_eq!(did_you_mean("timeout", fields), Some("timeouts"));
        assert_eq!(did_you_mean("protocl", fields), Some("protocol"));
        assert_eq!(did_you_mean("orderz", ["cart", "orders"]), Some("orders"));
        assert_eq!(did_you_mean("weight", fields), None);
        assert_eq!(
            did_you_mean("dns", fields),
            None,
            "an exact name is no typo"
        );
        assert_eq!(did_you_mean("", fields), None);
        assert_eq!(did_you_mean("http3", ["http1", "http2"]), None, "a tie");
    }

    #[test]
    fn distance_counts_a_swap_as_one() {
        let d = |a: &str, b: &str| {
            distance(
                &a.chars().collect::<Vec<_>>(),
                &b.chars().collect::<Vec<_>>(),
            )
        };
        assert_eq!(d("endpiont", "endpoint"), 1);
        assert_eq!(d("kitten", "sitting"), 3);
        assert_eq!(d("", "abc"), 3);
    }
}
