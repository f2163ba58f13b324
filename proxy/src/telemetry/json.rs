//! The few JSON writes an access-log line needs, appended to a reused buffer: strings escaped
//! as serde_json escapes them, integers two digits per division, floats through serde_json itself. The
//! line used to go through a derived `Serialize`, whose per-field machinery (and `fmt` for
//! the socket addresses) cost more than the rest of the line.

/// serde_json's escapes: `"` and `\` with a backslash, the C0 controls that have a short form
/// (`\b \t \n \f \r`) in it, the others as `\u00XX` (lowercase hex); everything else as is.
pub fn string(out: &mut Vec<u8>, text: &str) {
    utf8(out, text.as_bytes());
}

/// [`string`] of text kept as bytes (UTF-8, copied from a `str`): written as they are but
/// for the escapes, so other bytes would make the line invalid UTF-8, not unsafe.
pub fn utf8(out: &mut Vec<u8>, bytes: &[u8]) {
    // Most logged text has nothing to escape: found eight bytes at a time, then copied at once.
    let clean = clean_prefix(bytes, false);
    out.reserve(bytes.len() + 2);
    out.push(b'"');
    out.extend_from_slice(&bytes[..clean]);
    if clean < bytes.len() {
        escape(out, &bytes[clean..]);
    }
    out.push(b'"');
}

/// `bytes` escaped (see [`string`]), byte by byte.
fn escape(out: &mut Vec<u8>, bytes: &[u8]) {
    let mut run = 0;
    for (i, &byte) in bytes.iter().enumerate() {
        let escape = ESCAPE[usize::from(byte)];
        if escape == 0 {
            continue;
        }
        out.extend_from_slice(&bytes[run..i]);
        run = i + 1;
        if escape == b'u' {
            out.extend_from_slice(b"\\u00");
            out.push(HEX[usize::from(byte >> 4)]);
            out.push(HEX[usize::from(byte & 0xf)]);
        } else {
            out.push(b'\\');
            out.push(escape);
        }
    }
    out.extend_from_slice(&bytes[run..]);
}

/// Header bytes that JSON and [`super::lossless`] both write as they are (printable ASCII but
/// `"` and `\\`) as a JSON string; `false`, writing nothing, when there is any other byte.
pub fn plain_ascii(out: &mut Vec<u8>, bytes: &[u8]) -> bool {
    let clean = clean_prefix(bytes, true);
    let tail_plain = bytes[clean..]
        .iter()
        .all(|&byte| byte < 0x80 && ESCAPE[usize::from(byte)] == 0);
    if !tail_plain {
        return false;
    }
    out.reserve(bytes.len() + 2);
    out.push(b'"');
    out.extend_from_slice(bytes);
    out.push(b'"');
    true
}

/// How many leading bytes of `bytes` JSON writes as they are (and, with `ascii`, are ASCII):
/// all of them (`bytes.len()`) when that is so, else at least none and at most the true count.
/// Whole 8-byte words are tested at once for a byte below 0x20, `"` or `\\` (or, with `ascii`,
/// from 0x80), the last bytes as the last word (overlapping the one before), so text with
/// nothing to escape takes no byte-by-byte loop; text shorter than a word is looked at byte
/// by byte.
fn clean_prefix(bytes: &[u8], ascii: bool) -> usize {
    const ONES: u64 = 0x0101_0101_0101_0101;
    const HIGH: u64 = 0x8080_8080_8080_8080;
    // Exact for "is any byte of the word zero" (and "below 0x20"): the result is not 0 only
    // if some byte is.
    let any_zero = |word: u64| word.wrapping_sub(ONES) & !word & HIGH;
    let high = if ascii { HIGH } else { 0 };
    let dirty = |chunk: &[u8]| {
        let mut word = [0u8; 8];
        word.copy_from_slice(chunk);
        let word = u64::from_le_bytes(word);
        let control = word.wrapping_sub(ONES * 0x20) & !word & HIGH;
        let quote = any_zero(word ^ (ONES * u64::from(b'"')));
        let backslash = any_zero(word ^ (ONES * u64::from(b'\\')));
        control | quote | backslash | (word & high) != 0
    };
    let Some(last) = bytes.len().checked_sub(8) else {
        return bytes
            .iter()
            .take_while(|&&byte| ESCAPE[usize::from(byte)] == 0 && (!ascii || byte < 0x80))
            .count();
    };
    let mut clean = 0;
    for chunk in bytes.chunks_exact(8) {
        if dirty(chunk) {
            return clean;
        }
        clean += 8;
    }
    if clean == bytes.len() || !dirty(&bytes[last..]) {
        bytes.len()
    } else {
        clean
    }
}

/// For each byte, 0 when it is written as is, else the letter after the backslash (`u` for
/// `\u00XX`): a table lookup per byte, as serde_json does.
const ESCAPE: [u8; 256] = {
    let mut table = [0u8; 256];
    let mut byte = 0;
    while byte < 0x20 {
        table[byte] = b'u';
        byte += 1;
    }
    table[0x08] = b'b';
    table[0x09] = b't';
    table[0x0a] = b'n';
    table[0x0c] = b'f';
    table[0x0d] = b'r';
    table[b'"' as usize] = b'"';
    table[b'\\' as usize] = b'\\';
    table
};

const HEX: &[u8; 16] = b"0123456789abcdef";

/// An unsigned integer in decimal.
pub fn uint(out: &mut Vec<u8>, value: u64) {
    // Most logged integers (statuses, attempts, small sizes) have up to three digits: written
    // without the buffer and the copy of its variable length.
    match value {
        0..=9 => out.push(b'0' + value as u8),
        10..=99 => out.extend_from_slice(&pair(value)),
        100..=999 => {
            let [tens, ones] = pair(value % 100);
            out.extend_from_slice(&[b'0' + (value / 100) as u8, tens, ones]);
        }
        _ => {
            let mut digits = [0u8; 20];
            let start = decimal(&mut digits, value);
            out.extend_from_slice(&digits[start..]);
        }
    }
}

/// The two digits of `value % 100`.
pub fn pair(value: u64) -> [u8; 2] {
    let at = (value % 100) as usize * 2;
    [PAIRS[at], PAIRS[at + 1]]
}

/// `value` in decimal at the start of `slot` (at least five bytes); how many bytes it took.
fn port(slot: &mut [u8], value: u16) -> usize {
    let len = match value {
        0..=9 => 1,
        10..=99 => 2,
        100..=999 => 3,
        1_000..=9_999 => 4,
        _ => 5,
    };
    let mut value = u64::from(value);
    let mut end = len;
    while end >= 2 {
        slot[end - 2..end].copy_from_slice(&pair(value));
        value /= 100;
        end -= 2;
    }
    if end == 1 {
        slot[0] = b'0' + value as u8;
    }
    len
}

/// `00` to `99`: integers are written two digits per division.
const PAIRS: &[u8; 200] = b"\
    0001020304050607080910111213141516171819\
    2021222324252627282930313233343536373839\
    4041424344454647484950515253545556575859\
    6061626364656667686970717273747576777879\
    8081828384858687888990919293949596979899";

/// Writes `value` in decimal at the end of `digits`; returns where it starts.
fn decimal(digits: &mut [u8; 20], mut value: u64) -> usize {
    let mut start = digits.len();
    while value >= 100 {
        let pair = (value % 100) as usize * 2;
        value /= 100;
        start -= 2;
        digits[start..start + 2].copy_from_slice(&PAIRS[pair..pair + 2]);
    }
    if value >= 10 {
        let pair = value as usize * 2;
        start -= 2;
        digits[start..start + 2].copy_from_slice(&PAIRS[pair..pair + 2]);
    } else {
        start -= 1;
        digits[start] = b'0' + value as u8;
    }
    start
}

/// A float as serde_json writes it (shortest round-trip form; `null` when not finite).
pub fn float(out: &mut Vec<u8>, value: f64) {
    // Writing a number to a vector cannot fail.
    let _ = serde_json::to_writer(&mut *out, &value);
}

/// `duration` in seconds, byte for byte as [`float`] writes `duration.as_secs_f64()`.
///
/// From 10 µs to under a second (a request's usual time) it is written from the integer
/// nanoseconds, `0.` and their nine digits less the trailing zeros: that is the shortest text
/// that reads back as the same `f64` (`as_secs_f64` rounds `nanos / 1e9` once, and two such
/// texts differ by at least 1e-9, far more than the float's precision there), and it is the
/// fixed notation serde_json uses from 1e-5 up. Other durations (0, under 10 µs, which
/// serde_json writes with an exponent, and a second or more, where `as_secs_f64` rounds
/// twice) go through [`float`].
pub fn seconds(out: &mut Vec<u8>, duration: std::time::Duration) {
    let nanos = duration.subsec_nanos();
    if duration.as_secs() != 0 || nanos < 10_000 {
        return float(out, duration.as_secs_f64());
    }
    // `0.` then the nine digits (below 1e9), zero-padded.
    let mut text = *b"0.000000000\0\0\0\0\0";
    let nanos = u64::from(nanos);
    // Divisions by constants: multiplications.
    text[2] = b'0' + (nanos / 100_000_000) as u8;
    text[3..5].copy_from_slice(&pair(nanos / 1_000_000));
    text[5..7].copy_from_slice(&pair(nanos / 10_000));
    text[7..9].copy_from_slice(&pair(nanos / 100));
    text[9..11].copy_from_slice(&pair(nanos));
    // nanos >= 10_000: one of the nine digits is not 0, so the text ends in one.
    let mut end = 11;
    while end > 3 && text[end - 1] == b'0' {
        end -= 1;
    }
    // All of the buffer (a fixed-size copy, no call), then cut back to the text.
    let len = out.len();
    out.extend_from_slice(&text);
    out.truncate(len + end);
}

/// `value` as JSON, `null` when absent.
// Inlined: a call per field cost more than the choice it makes.
#[inline(always)]
pub fn or_null<T>(out: &mut Vec<u8>, value: Option<T>, write: impl FnOnce(&mut Vec<u8>, T)) {
    match value {
        Some(value) => write(out, value),
        None => out.extend_from_slice(b"null"),
    }
}

/// A socket address as a JSON string, as its Display writes it; IPv4 made on the stack from
/// a table of the octets' digits and copied once (the usual case, where `fmt` cost several
/// times the rest of the field).
pub fn socket_addr(out: &mut Vec<u8>, addr: &std::net::SocketAddr) {
    match addr {
        std::net::SocketAddr::V4(v4) => {
            // `"255.255.255.255:65535"` is 23 bytes; the rest is room for the octets' whole
            // table entries (four bytes each, the fourth overwritten).
            let mut text = [0u8; 32];
            text[0] = b'"';
            let mut at = 1;
            for octet in v4.ip().octets() {
                let entry = OCTETS[usize::from(octet)];
                text[at..at + 4].copy_from_slice(&entry);
                at += usize::from(entry[3]);
                text[at] = b'.';
                at += 1;
            }
            // The last octet's `.` is the port's `:`.
            text[at - 1] = b':';
            at += port(&mut text[at..], v4.port());
            text[at] = b'"';
            // All of the buffer (a fixed-size copy, no call), then cut back to the text.
            let len = out.len();
            out.extend_from_slice(&text);
            out.truncate(len + at + 1);
        }
        std::net::SocketAddr::V6(_) => display(out, addr),
    }
}

/// Each byte's decimal digits (one to three), then how many there are (IPv4 text here and in
/// spans).
pub(crate) const OCTETS: [[u8; 4]; 256] = {
    let mut table = [[0u8; 4]; 256];
    let mut value = 0;
    while value < 256 {
        let (hundreds, tens, ones) = (value / 100, value / 10 % 10, value % 10);
        table[value] = if value >= 100 {
            [
                b'0' + hundreds as u8,
                b'0' + tens as u8,
                b'0' + ones as u8,
                3,
            ]
        } else if value >= 10 {
            [b'0' + tens as u8, b'0' + ones as u8, 0, 2]
        } else {
            [b'0' + ones as u8, 0, 0, 1]
        };
        value += 1;
    }
    table
};

/// `value`'s Display form as a JSON string, formatted on the stack when it fits (socket
/// addresses always do).
fn display(out: &mut Vec<u8>, value: &impl std::fmt::Display) {
    use std::io::Write as _;
    let mut buf = [0u8; 64];
    let mut rest = &mut buf[..];
    if write!(rest, "{value}").is_ok() {
        let written = 64 - rest.len();
        if let Ok(text) = std::str::from_utf8(&buf[..written]) {
            return string(out, text);
        }
    }
    string(out, &value.to_string());
}

#[cfg(test)]
mod tests {
    use super::*;

    fn corpus() -> Vec<String> {
        let mut texts: Vec<String> = [
            "",
            "plain",
            "quote \" and backslash \\ and slash /",
            "caf\u{e9} \u{1f600} \u{2028}\u{2029} \u{ffff}",
            "tab\there\nnewline\r\u{8}\u{c}",
            "del \u{7f} and C1 \u{85}",
            "\\x41 stays \\x41",
            "trailing\u{1}",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        // Every ASCII byte, alone and inside text; and at every place of a 17-byte text, so
        // that each 8-byte word and the tail see it.
        for byte in 0u8..0x80 {
            let c = char::from(byte);
            texts.push(c.to_string());
            texts.push(format!("a{c}b{c}"));
            for at in 0..17 {
                let mut text: Vec<char> = "caf\u{e9}-text/1.2.34567".chars().take(17).collect();
                text[at] = c;
                texts.push(text.into_iter().collect());
            }
        }
        texts
    }

    #[test]
    fn strings_are_escaped_as_serde_json_escapes_them() {
        for text in corpus() {
            let mut out = Vec::new();
            string(&mut out, &text);
            let expected = serde_json::to_string(&text).expect("serialized");
            assert_eq!(String::from_utf8(out).expect("UTF-8"), expected, "{text:?}");
        }
    }

    #[test]
    fn plain_header_bytes_are_written_as_lossless_then_escaped() {
        let mut texts: Vec<Vec<u8>> = corpus().into_iter().map(String::into_bytes).collect();
        // Every byte at every place of a 17-byte value, so each word and the tail see it.
        for byte in [0x00, 0x1f, 0x20, b'"', b'\\', 0x7e, 0x7f, 0x80, 0xff] {
            for at in 0..17 {
                let mut text = b"user-agent/1.2.34".to_vec();
                text[at] = byte;
                texts.push(text);
            }
        }
        for text in texts {
            let mut out = Vec::new();
            let mut expected = Vec::new();
            string(&mut expected, &super::super::lossless(&text));
            if plain_ascii(&mut out, &text) {
                assert_eq!(out, expected, "{text:?}");
            } else {
                assert!(out.is_empty(), "{text:?}");
                let plain = text
                    .iter()
                    .all(|&b| (0x20..0x80).contains(&b) && b != b'"' && b != b'\\');
                assert!(!plain, "{text:?} is plain");
            }
        }
    }

    #[test]
    fn numbers_are_written_as_serde_json_writes_them() {
        let mut values = vec![65_535, u64::from(u32::MAX), u64::MAX - 1, u64::MAX];
        values.extend((0..=1_000).chain((1..20).map(|n| 10u64.pow(n))));
        values.extend((1..20).map(|n| 10u64.pow(n) - 1));
        for value in values {
            let mut out = Vec::new();
            uint(&mut out, value);
            assert_eq!(out, serde_json::to_vec(&value).expect("serialized"));
        }
        for value in [
            0.0,
            1e-7,
            0.000_123,
            0.5,
            1.25,
            3_600.000_001,
            f64::NAN,
            f64::INFINITY,
        ] {
            let mut out = Vec::new();
            float(&mut out, value);
            assert_eq!(out, serde_json::to_vec(&value).expect("serialized"));
        }
    }

    #[test]
    fn texts_of_every_length_are_escaped_wherever_the_byte_to_escape_is() {
        // Shorter than a word, whole words, and a last word overlapping the one before: a
        // byte to escape (or not ASCII) at each place of each length.
        for len in 0..=25 {
            for byte in [b'"', b'\\', 0x00, 0x1f, 0x7f, 0x80, 0xff, b'a'] {
                for at in 0..len.max(1) {
                    let mut bytes: Vec<u8> = b"abcdefghijklmnopqrstuvwxy"[..len].to_vec();
                    if len > 0 {
                        bytes[at] = byte;
                    }
                    let text = String::from_utf8_lossy(&bytes).into_owned();
                    let mut out = Vec::new();
                    string(&mut out, &text);
                    let expected = serde_json::to_vec(&text).expect("serialized");
                    assert_eq!(out, expected, "{text:?}");
                    let mut out = Vec::new();
                    let plain = bytes
                        .iter()
                        .all(|&b| (0x20..0x80).contains(&b) && b != b'"' && b != b'\\');
                    assert_eq!(plain_ascii(&mut out, &bytes), plain, "{bytes:?}");
                    if plain {
                        assert_eq!(out, expected, "{bytes:?}");
                    } else {
                        assert!(out.is_empty(), "{bytes:?}");
                    }
                }
            }
        }
    }

    #[test]
    fn durations_are_written_as_serde_json_writes_their_seconds() {
        use std::time::Duration;
        let mut durations = vec![
            Duration::ZERO,
            Duration::from_nanos(1),
            Duration::from_nanos(9_999),
            Duration::from_nanos(10_000),
            Duration::from_nanos(10_001),
            Duration::from_nanos(100_000),
            Duration::from_nanos(123_456_789),
            Duration::from_nanos(999_999_999),
            Duration::from_secs(1),
            Duration::new(1, 1),
            Duration::new(3_600, 1_000),
            Duration::new(u64::MAX, 999_999_999),
        ];
        // Every power of ten and its neighbours, then many more: a cheap generator is enough.
        for power in 0..19 {
            let nanos = 10u64.pow(power);
            durations.extend([nanos - 1, nanos, nanos + 1].map(Duration::from_nanos));
        }
        let mut state = 0x9e37_79b9_7f4a_7c15_u64;
        for _ in 0..200_000 {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            // Mostly below a second, with every number of trailing zeros.
            let nanos = (state >> 34) % 1_000_000_000 / 10u64.pow((state % 9) as u32)
                * 10u64.pow((state % 9) as u32);
            durations.push(Duration::from_nanos(nanos));
            durations.push(Duration::new(
                state % 100,
                (state >> 32) as u32 % 1_000_000_000,
            ));
        }
        for duration in durations {
            let mut out = Vec::new();
            seconds(&mut out, duration);
            let expected = serde_json::to_vec(&duration.as_secs_f64()).expect("serialized");
            assert_eq!(
                String::from_utf8_lossy(&out),
                String::from_utf8_lossy(&expected),
                "{duration:?}"
            );
        }
    }

    #[test]
    fn every_ipv4_octet_and_many_ports_are_written_as_display_writes_them() {
        for octet in 0..=255u8 {
            for port in [0, 9, 10, 99, 100, 999, 1_000, 9_999, 10_000, 65_535] {
                let addr = std::net::SocketAddr::from(([octet, 255 - octet, octet / 3, 7], port));
                let mut out = Vec::new();
                socket_addr(&mut out, &addr);
                assert_eq!(out, format!("\"{addr}\"").into_bytes(), "{addr}");
            }
        }
    }

    #[test]
    fn socket_addresses_are_written_as_serde_writes_them() {
        for addr in [
            "127.0.0.1:9",
            "0.0.0.0:0",
            "10.20.30.40:80",
            "255.255.255.255:65535",
            "1.100.99.9:10000",
            "[::1]:443",
            "[ffff:ffff:ffff:ffff:ffff:ffff:255.255.255.255]:65535",
        ] {
            let addr: std::net::SocketAddr = addr.parse().expect("address");
            let mut out = Vec::new();
            socket_addr(&mut out, &addr);
            assert_eq!(
                out,
                serde_json::to_vec(&addr).expect("serialized"),
                "{addr}"
            );
        }
    }
}
