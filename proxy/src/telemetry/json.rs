//! The few JSON writes an access-log line needs, appended to a reused buffer: strings escaped
//! as serde_json escapes them, integers two digits per division, floats through serde_json itself. The
//! line used to go through a derived `Serialize`, whose per-field machinery (and `fmt` for
//! the socket addresses) cost more than the rest of the line.

/// serde_json's escapes: `"` and `\` with a backslash, the C0 controls that have a short form
/// (`\b \t \n \f \r`) in it, the others as `\u00XX` (lowercase hex); everything else as is.
pub fn string(out: &mut Vec<u8>, text: &str) {
    let bytes = text.as_bytes();
    // Most logged text has nothing to escape: found eight bytes at a time, then copied at once.
    let clean = clean_words(bytes, false);
    out.reserve(bytes.len() + 2);
    out.push(b'"');
    out.extend_from_slice(&bytes[..clean]);
    let mut run = clean;
    for (i, &byte) in bytes.iter().enumerate().skip(clean) {
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
    out.push(b'"');
}

/// Header bytes that JSON and [`super::lossless`] both write as they are (printable ASCII but
/// `"` and `\\`) as a JSON string; `false`, writing nothing, when there is any other byte.
pub fn plain_ascii(out: &mut Vec<u8>, bytes: &[u8]) -> bool {
    let clean = clean_words(bytes, true);
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

/// How many leading bytes of `bytes` JSON writes as they are (and, with `ascii`, are ASCII),
/// give or take up to seven: whole 8-byte words are tested at once for a byte below 0x20,
/// `"` or `\\` (or, with `ascii`, from 0x80); the rest is left to a byte-by-byte loop.
fn clean_words(bytes: &[u8], ascii: bool) -> usize {
    const ONES: u64 = 0x0101_0101_0101_0101;
    const HIGH: u64 = 0x8080_8080_8080_8080;
    // Exact for "is any byte of the word zero" (and "below 0x20"): the result is not 0 only
    // if some byte is.
    let any_zero = |word: u64| word.wrapping_sub(ONES) & !word & HIGH;
    let high = if ascii { HIGH } else { 0 };
    let mut clean = 0;
    for chunk in bytes.chunks_exact(8) {
        let mut word = [0u8; 8];
        word.copy_from_slice(chunk);
        let word = u64::from_le_bytes(word);
        let control = word.wrapping_sub(ONES * 0x20) & !word & HIGH;
        let quote = any_zero(word ^ (ONES * u64::from(b'"')));
        let backslash = any_zero(word ^ (ONES * u64::from(b'\\')));
        if control | quote | backslash | (word & high) != 0 {
            break;
        }
        clean += 8;
    }
    clean
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
    let mut digits = [0u8; 20];
    let start = decimal(&mut digits, value);
    out.extend_from_slice(&digits[start..]);
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

/// `value` as JSON, `null` when absent.
pub fn or_null<T>(out: &mut Vec<u8>, value: Option<T>, write: impl FnOnce(&mut Vec<u8>, T)) {
    match value {
        Some(value) => write(out, value),
        None => out.extend_from_slice(b"null"),
    }
}

/// A socket address as a JSON string, as its Display writes it; IPv4 made on the stack and
/// copied once (the usual case, where `fmt` cost several times the rest of the field).
pub fn socket_addr(out: &mut Vec<u8>, addr: &std::net::SocketAddr) {
    match addr {
        std::net::SocketAddr::V4(v4) => {
            // `"255.255.255.255:65535"` is 23 bytes.
            let mut text = [0u8; 23];
            text[0] = b'"';
            let mut at = 1;
            for (i, octet) in v4.ip().octets().into_iter().enumerate() {
                if i > 0 {
                    text[at] = b'.';
                    at += 1;
                }
                at += small(&mut text[at..], octet);
            }
            text[at] = b':';
            at += 1;
            let mut port = [0u8; 20];
            let start = decimal(&mut port, u64::from(v4.port()));
            let port = &port[start..];
            text[at..at + port.len()].copy_from_slice(port);
            at += port.len();
            text[at] = b'"';
            out.extend_from_slice(&text[..=at]);
        }
        std::net::SocketAddr::V6(_) => display(out, addr),
    }
}

/// `value` in decimal at the start of `slot` (at least 3 bytes long); how many bytes it took.
fn small(slot: &mut [u8], value: u8) -> usize {
    let mut digits = [0u8; 20];
    let start = decimal(&mut digits, u64::from(value));
    let len = digits.len() - start;
    slot[..len].copy_from_slice(&digits[start..]);
    len
}

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
