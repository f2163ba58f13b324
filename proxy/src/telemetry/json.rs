//! The few JSON writes an access-log line needs, appended to a reused buffer: strings escaped
//! as serde_json escapes them, integers digit by digit, floats through serde_json itself. The
//! line used to go through a derived `Serialize`, whose per-field machinery (and `fmt` for
//! the socket addresses) cost more than the rest of the line.

/// serde_json's escapes: `"` and `\` with a backslash, the C0 controls that have a short form
/// (`\b \t \n \f \r`) in it, the others as `\u00XX` (lowercase hex); everything else as is.
pub fn string(out: &mut Vec<u8>, text: &str) {
    out.push(b'"');
    let bytes = text.as_bytes();
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
    out.push(b'"');
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
pub fn uint(out: &mut Vec<u8>, mut value: u64) {
    let mut digits = [0u8; 20];
    let mut start = digits.len();
    loop {
        start -= 1;
        digits[start] = b'0' + (value % 10) as u8;
        value /= 10;
        if value == 0 {
            break;
        }
    }
    out.extend_from_slice(&digits[start..]);
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

/// A socket address as a JSON string, as its Display writes it; IPv4 digit by digit (the
/// usual case, where `fmt` cost several times the rest of the field).
pub fn socket_addr(out: &mut Vec<u8>, addr: &std::net::SocketAddr) {
    match addr {
        std::net::SocketAddr::V4(v4) => {
            out.push(b'"');
            ipv4(out, *v4.ip());
            out.push(b':');
            uint(out, u64::from(v4.port()));
            out.push(b'"');
        }
        std::net::SocketAddr::V6(_) => display(out, addr),
    }
}

/// An IPv4 address in dotted decimal.
pub fn ipv4(out: &mut Vec<u8>, ip: std::net::Ipv4Addr) {
    for (i, octet) in ip.octets().into_iter().enumerate() {
        if i > 0 {
            out.push(b'.');
        }
        uint(out, u64::from(octet));
    }
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
        // Every ASCII byte, alone and inside text.
        for byte in 0u8..0x80 {
            let c = char::from(byte);
            texts.push(c.to_string());
            texts.push(format!("a{c}b{c}"));
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
    fn numbers_are_written_as_serde_json_writes_them() {
        for value in [0, 1, 9, 10, 99, 100, 65_535, u64::from(u32::MAX), u64::MAX] {
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
