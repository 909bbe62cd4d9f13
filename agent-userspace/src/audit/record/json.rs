//! The JSON of an audit line, written straight into the line buffer.
//!
//! Every record is encoded on the writer's thread, so the encoding is most of what an
//! audit record costs the daemon. The layout is fixed ([`super::wire`]), so keys are
//! written as the literals they are (no escaping, no per-key call chain), numbers through
//! `itoa`, and only strings that come from outside the code are scanned for characters
//! JSON must escape. The output is byte for byte what `serde_json` writes for the same
//! layout (the wire types still derive `Serialize`, for [`super::fit`] and to test that).

use std::{borrow::Cow, io::Write as _, net::IpAddr};

/// A value that writes itself as JSON.
pub(super) trait Json {
    fn json(&self, out: &mut Vec<u8>);
}

/// An object being written: `{`, then fields, then [`Obj::end`]'s `}`.
pub(super) struct Obj<'o> {
    out: &'o mut Vec<u8>,
    first: bool,
}

impl<'o> Obj<'o> {
    pub(super) fn new(out: &'o mut Vec<u8>) -> Self {
        out.push(b'{');
        Self { out, first: true }
    }

    /// Writes `"key":` (after a comma unless it is the first field). Keys are literals of
    /// the layout and never need escaping.
    #[inline]
    fn key(&mut self, key: &'static str) -> &mut Vec<u8> {
        debug_assert!(!key.bytes().any(needs_escape), "key {key:?}");
        if !std::mem::take(&mut self.first) {
            self.out.push(b',');
        }
        self.out.push(b'"');
        self.out.extend_from_slice(key.as_bytes());
        self.out.extend_from_slice(b"\":");
        self.out
    }

    #[inline]
    pub(super) fn field<T: Json + ?Sized>(&mut self, key: &'static str, value: &T) -> &mut Self {
        value.json(self.key(key));
        self
    }

    /// The field if the value is there (`skip_serializing_if = "Option::is_none"`).
    #[inline]
    pub(super) fn opt<T: Json>(&mut self, key: &'static str, value: &Option<T>) -> &mut Self {
        if let Some(value) = value {
            self.field(key, value);
        }
        self
    }

    pub(super) fn end(&mut self) {
        self.out.push(b'}');
    }
}

/// Whether JSON needs `b` escaped inside a string (as serde_json escapes: control
/// characters, `"` and `\`).
#[inline]
fn needs_escape(b: u8) -> bool {
    b < 0x20 || b == b'"' || b == b'\\'
}

/// Writes `s` as a JSON string.
pub(super) fn string(s: &str, out: &mut Vec<u8>) {
    let bytes = s.as_bytes();
    out.reserve(bytes.len() + 2);
    out.push(b'"');
    let mut start = 0;
    for (i, &b) in bytes.iter().enumerate() {
        if !needs_escape(b) {
            continue;
        }
        out.extend_from_slice(&bytes[start..i]);
        match b {
            b'"' => out.extend_from_slice(b"\\\""),
            b'\\' => out.extend_from_slice(b"\\\\"),
            b'\n' => out.extend_from_slice(b"\\n"),
            b'\r' => out.extend_from_slice(b"\\r"),
            b'\t' => out.extend_from_slice(b"\\t"),
            0x08 => out.extend_from_slice(b"\\b"),
            0x0c => out.extend_from_slice(b"\\f"),
            _ => {
                const HEX: &[u8; 16] = b"0123456789abcdef";
                out.extend_from_slice(b"\\u00");
                out.push(HEX[usize::from(b >> 4)]);
                out.push(HEX[usize::from(b & 0xf)]);
            }
        }
        start = i + 1;
    }
    out.extend_from_slice(&bytes[start..]);
    out.push(b'"');
}

impl Json for str {
    #[inline]
    fn json(&self, out: &mut Vec<u8>) {
        string(self, out);
    }
}

impl Json for String {
    #[inline]
    fn json(&self, out: &mut Vec<u8>) {
        string(self, out);
    }
}

impl Json for Cow<'_, str> {
    #[inline]
    fn json(&self, out: &mut Vec<u8>) {
        string(self, out);
    }
}

impl<T: Json + ?Sized> Json for &T {
    #[inline]
    fn json(&self, out: &mut Vec<u8>) {
        (**self).json(out);
    }
}

macro_rules! integers {
    ($($ty:ty),*) => {
        $(impl Json for $ty {
            #[inline]
            fn json(&self, out: &mut Vec<u8>) {
                out.extend_from_slice(itoa::Buffer::new().format(*self).as_bytes());
            }
        })*
    };
}
integers!(u16, u32, u64, usize);

impl Json for bool {
    fn json(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(if *self { b"true" } else { b"false" });
    }
}

impl Json for f64 {
    fn json(&self, out: &mut Vec<u8>) {
        // Rare (one field of one kind): serde_json's own formatting (`null` if not finite).
        if serde_json::to_writer(&mut *out, self).is_err() {
            out.extend_from_slice(b"null");
        }
    }
}

impl Json for IpAddr {
    fn json(&self, out: &mut Vec<u8>) {
        out.push(b'"');
        match self {
            IpAddr::V4(v4) => {
                for (i, octet) in v4.octets().into_iter().enumerate() {
                    if i > 0 {
                        out.push(b'.');
                    }
                    out.extend_from_slice(itoa::Buffer::new().format(octet).as_bytes());
                }
            }
            // Writing into a Vec cannot fail; the text has nothing to escape.
            IpAddr::V6(v6) => {
                let _ = write!(out, "{v6}");
            }
        }
        out.push(b'"');
    }
}

impl<T: Json> Json for [T] {
    fn json(&self, out: &mut Vec<u8>) {
        out.push(b'[');
        for (i, item) in self.iter().enumerate() {
            if i > 0 {
                out.push(b',');
            }
            item.json(out);
        }
        out.push(b']');
    }
}

impl<T: Json> Json for Vec<T> {
    #[inline]
    fn json(&self, out: &mut Vec<u8>) {
        self.as_slice().json(out);
    }
}

#[cfg(test)]
#[expect(clippy::unwrap_used, reason = "tests fail loudly on unexpected errors")]
mod tests {
    use super::*;

    fn text<T: Json + ?Sized>(value: &T) -> String {
        let mut out = Vec::new();
        value.json(&mut out);
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn strings_are_escaped_as_serde_json_escapes_them() {
        let mut every_byte: String = (0u8..0x80).map(char::from).collect();
        every_byte.push_str("é…\u{2028}\u{10ffff}");
        for s in [
            "",
            "plain",
            "quote \" and backslash \\",
            "a\nb\rc\td\u{8}e\u{c}f\u{0}g\u{1f}h\u{7f}",
            &every_byte,
        ] {
            assert_eq!(text(s), serde_json::to_string(s).unwrap(), "{s:?}");
        }
    }

    #[test]
    fn numbers_addresses_and_lists_match_serde_json() {
        for n in [0u64, 7, 10, 4_294_967_296, u64::MAX] {
            assert_eq!(text(&n), serde_json::to_string(&n).unwrap());
        }
        for f in [0.0, 1.5, 3.0, 1e-7, 123_456.789_012, f64::NAN] {
            assert_eq!(text(&f), serde_json::to_string(&f).unwrap());
        }
        for ip in [
            "0.0.0.0",
            "192.0.2.10",
            "255.255.255.255",
            "::",
            "2001:db8::1",
            "::ffff:192.0.2.1",
            "fe80::1:2:3:4",
        ] {
            let ip: IpAddr = ip.parse().unwrap();
            assert_eq!(text(&ip), serde_json::to_string(&ip).unwrap());
        }
        let list = vec!["a", "b\"c"];
        assert_eq!(text(&list), serde_json::to_string(&list).unwrap());
        let empty: Vec<&str> = Vec::new();
        assert_eq!(text(&empty), "[]");
    }

    #[test]
    fn objects_separate_fields_and_skip_absent_ones() {
        let mut out = Vec::new();
        let mut o = Obj::new(&mut out);
        o.opt::<u32>("none", &None)
            .field("a", &1u32)
            .opt("b", &Some("x"))
            .field("c", &true);
        o.end();
        assert_eq!(
            String::from_utf8(out).unwrap(),
            r#"{"a":1,"b":"x","c":true}"#
        );
    }
}
