//! The JSON of an audit line, written straight into the line buffer.
//!
//! Every record is encoded on the writer's thread, so the encoding is most of what an
//! audit record costs the daemon. The layout is fixed ([`super::wire`]), so keys are
//! written as the literals they are (no escaping, no per-key call chain), numbers through
//! `itoa`, and only strings that come from outside the code are scanned for characters
//! JSON must escape. The output is byte for byte what `serde_json` writes for the same
//! layout (the wire types still derive `Serialize`, for [`super::fit`] and to test that),
//! except that characters a reader of the line must not meet raw are escaped too
//! ([`string`]).

use std::{borrow::Cow, io::Write as _, net::IpAddr};

use crate::text::misleads;

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

/// Bytes at which a string may need escaping: what JSON needs escaped, DEL, and the
/// first bytes of the UTF-8 encodings of the other characters [`misleads`] (C1 and the
/// soft hyphen `C2`, `U+034F` `CD`, `U+061C` `D8`, fillers and selectors `E1`, `E3`,
/// `U+200B`..`U+206F` `E2`, `U+FE00`..`U+FFFB` `EF`, those past the Basic Multilingual
/// Plane `F0`, `F3`).
const MAY_ESCAPE: [bool; 256] = {
    let mut table = [false; 256];
    let mut b = 0;
    while b < 256 {
        table[b] = b < 0x20 || b == b'"' as usize || b == b'\\' as usize || b == 0x7f;
        b += 1;
    }
    let mut i = 0;
    let firsts = [0xc2, 0xcd, 0xd8, 0xe1, 0xe2, 0xe3, 0xef, 0xf0, 0xf3];
    while i < firsts.len() {
        table[firsts[i]] = true;
        i += 1;
    }
    table
};

/// Writes `s` as a JSON string. Beyond what JSON requires (and serde_json writes), every
/// character a reader of the line must not meet raw ([`misleads`]: DEL, C1 controls,
/// bidirectional and zero-width formatting, line and paragraph separators) is written as
/// a `\u` escape: a parser reads the same string back, while `tail` on a terminal, a
/// viewer or a line splitter sees it spelled out instead of obeying it.
pub(super) fn string(s: &str, out: &mut Vec<u8>) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let bytes = s.as_bytes();
    out.reserve(bytes.len() + 2);
    out.push(b'"');
    let mut start = 0;
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        if !MAY_ESCAPE[usize::from(b)] {
            i += 1;
            continue;
        }
        // The character at `i` (its code, its length) and whether it is escaped.
        let (code, len, escaped) = if b.is_ascii() {
            (u32::from(b), 1, needs_escape(b) || b == 0x7f)
        } else {
            match s.get(i..).and_then(|rest| rest.chars().next()) {
                Some(c) => (u32::from(c), c.len_utf8(), misleads(c)),
                None => (0, 1, false),
            }
        };
        if !escaped {
            i += len;
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
                // Past the Basic Multilingual Plane, as its UTF-16 surrogate pair.
                let units = if code > 0xffff {
                    let v = code - 0x1_0000;
                    [Some(0xd800 | (v >> 10)), Some(0xdc00 | (v & 0x3ff))]
                } else {
                    [Some(code), None]
                };
                for unit in units.into_iter().flatten() {
                    out.extend_from_slice(b"\\u");
                    for shift in [12, 8, 4, 0] {
                        out.push(HEX[((unit >> shift) & 0xf) as usize]);
                    }
                }
            }
        }
        i += len;
        start = i;
    }
    out.extend_from_slice(&bytes[start..]);
    out.push(b'"');
}

/// The bytes [`string`] writes for `c`: its escape, or itself.
pub(super) fn written_len(c: char) -> usize {
    let escaped = if c.is_ascii() {
        needs_escape(c as u8) || c == '\u{7f}'
    } else {
        misleads(c)
    };
    match c {
        _ if !escaped => c.len_utf8(),
        '"' | '\\' | '\n' | '\r' | '\t' | '\u{8}' | '\u{c}' => 2,
        _ if u32::from(c) > 0xffff => 12,
        _ => 6,
    }
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

/// A record being shortened ([`super::fit`]) is a `Value`; it is written by the same
/// string escaping as every other line (object keys in the map's order, as serde_json
/// writes them).
impl Json for serde_json::Value {
    fn json(&self, out: &mut Vec<u8>) {
        use serde_json::Value;
        match self {
            Value::Null => out.extend_from_slice(b"null"),
            Value::Bool(b) => b.json(out),
            Value::Number(n) => out.extend_from_slice(n.to_string().as_bytes()),
            Value::String(s) => string(s, out),
            Value::Array(items) => items.json(out),
            Value::Object(map) => {
                out.push(b'{');
                for (i, (key, value)) in map.iter().enumerate() {
                    if i > 0 {
                        out.push(b',');
                    }
                    string(key, out);
                    out.push(b':');
                    value.json(out);
                }
                out.push(b'}');
            }
        }
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
        let mut every_byte: String = (0u8..0x7f).map(char::from).collect();
        every_byte.push_str("é…\u{10ffff}\u{a0}\u{200a}\u{2030}\u{2070}\u{fefe}€日本😀");
        for s in [
            "",
            "plain",
            "quote \" and backslash \\",
            "a\nb\rc\td\u{8}e\u{c}f\u{0}g\u{1f}h",
            &every_byte,
        ] {
            assert_eq!(text(s), serde_json::to_string(s).unwrap(), "{s:?}");
        }
    }

    #[test]
    fn characters_that_mislead_a_reader_are_spelled_out() {
        for (c, escape) in [
            ('\u{7f}', r"\u007f"),
            ('\u{80}', r"\u0080"),
            ('\u{85}', r"\u0085"),
            ('\u{9b}', r"\u009b"),
            ('\u{9f}', r"\u009f"),
            ('\u{61c}', r"\u061c"),
            ('\u{200b}', r"\u200b"),
            ('\u{200f}', r"\u200f"),
            ('\u{2028}', r"\u2028"),
            ('\u{2029}', r"\u2029"),
            ('\u{202e}', r"\u202e"),
            ('\u{2066}', r"\u2066"),
            ('\u{2069}', r"\u2069"),
            ('\u{feff}', r"\u feff"),
            ('\u{ad}', r"\u00ad"),
            ('\u{2062}', r"\u2062"),
            ('\u{3164}', r"\u3164"),
            ('\u{fe0f}', r"\ufe0f"),
            ('\u{e0041}', r"\udb40\udc41"),
            ('\u{e01ef}', r"\udb40\uddef"),
            ('\u{1d173}', r"\ud834\udd73"),
        ] {
            let escape = escape.replace(' ', "");
            let s = format!("a{c}é{c}{c}z");
            let line = text(s.as_str());
            assert_eq!(line, format!("\"a{escape}é{escape}{escape}z\""), "{c:?}");
            // A parser reads back the string that was written.
            assert_eq!(serde_json::from_str::<String>(&line).unwrap(), s);
        }
    }

    /// Every character that misleads is escaped: its first byte is one the encoder looks
    /// at, and nothing else is.
    #[test]
    fn the_table_of_first_bytes_covers_every_misleading_character() {
        for c in (0..=0x10_ffff).filter_map(char::from_u32) {
            let mut buf = [0u8; 4];
            let first = c.encode_utf8(&mut buf).as_bytes()[0];
            if crate::text::misleads(c) {
                assert!(MAY_ESCAPE[usize::from(first)], "{c:?}");
            }
        }
    }

    /// What [`written_len`] counts is what [`string`] writes, for every character.
    #[test]
    fn written_lengths_are_those_written() {
        for c in (0..=0x10_ffff).filter_map(char::from_u32) {
            let mut out = Vec::new();
            string(c.encode_utf8(&mut [0; 4]), &mut out);
            assert_eq!(written_len(c), out.len() - 2, "{c:?}");
        }
    }

    #[test]
    fn shortened_values_are_escaped_alike() {
        let value = serde_json::json!({
            "b": "x\u{2028}y\n",
            "a": [1, 2.5, null, true, {"k\u{202e}": "v"}],
        });
        assert_eq!(
            text(&value),
            r#"{"a":[1,2.5,null,true,{"k\u202e":"v"}],"b":"x\u2028y\n"}"#
        );
        let plain = serde_json::json!({"z": "plain", "a": {"n": -3, "s": "q\"\\"}});
        assert_eq!(text(&plain), serde_json::to_string(&plain).unwrap());
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
