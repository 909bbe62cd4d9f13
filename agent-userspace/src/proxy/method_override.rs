//! Method overrides that frameworks read from a request's query or body: a POST that
//! carries `_method=DELETE` runs as a DELETE in Rails (`Rack::MethodOverride`, from the
//! form fields), Laravel (query, form or JSON fields) and Symfony (query or form fields).
//! A rule that allows `POST /x` must not allow `DELETE /x` that way, so such keys are
//! refused wherever those frameworks read them. The override headers themselves are
//! removed from every request (see `inject`).

use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http::header::{CONTENT_ENCODING, CONTENT_TYPE};
use http::HeaderMap;
use hyper::body::{Body as _, Incoming};
use tokio::sync::Semaphore;

use super::body::{next_piece, Piece};
use super::held::{Held, HeldBody, Spent, MAX_HELD_BYTES, MAX_HELD_PER_SANDBOX};
use super::Route;

/// Largest POST body read whole to look for an override field; a larger one of a kind
/// frameworks parse is refused where an override would matter.
pub const MAX_FORM_BYTES: usize = 1 << 20;

/// Longest time such a body may take to arrive whole, however steadily it trickles.
pub const MAX_FORM_SECS: u64 = 120;

/// A method no rule lists: a rule that refuses it lists its methods, so some method an
/// override could name (Laravel and Symfony take any) is refused there.
const UNLISTED_METHOD: &str = "EGRESSD-OVERRIDE-PROBE";

/// A query key of `target` that names a method override, as written.
pub fn in_query(target: &str) -> Option<String> {
    let (_, query) = target.split_once('?')?;
    query_keys(query).find(|key| is_override_key(key))
}

/// The keys of `query`, decoded as form fields are (`+` as a space, `;` separating too).
pub fn query_keys(query: &str) -> impl Iterator<Item = String> + '_ {
    form_keys(query.as_bytes())
}

/// The operation Vault and OpenBao run this `GET` as, beside the `GET` itself: `LIST`
/// when its query has a `list` key, `SCAN` (OpenBao's recursive listing) when it has a
/// `scan` key, whose value Go's `strconv.ParseBool` reads as true. Both when both.
pub fn runs_as<'t>(method: &str, target: &'t str) -> impl Iterator<Item = &'static str> + 't {
    let query = (method == "GET")
        .then(|| target.split_once('?').map(|(_, query)| query))
        .flatten()
        .unwrap_or("");
    let truthy = move |name: &str| {
        query.split('&').any(|pair| {
            let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
            let decode =
                |s: &str| String::from_utf8_lossy(&super::inject::percent_decode(s)).into_owned();
            decode(key) == name
                && matches!(
                    decode(value).as_str(),
                    "1" | "t" | "T" | "TRUE" | "true" | "True"
                )
        })
    };
    [("list", "LIST"), ("scan", "SCAN")]
        .into_iter()
        .filter(move |(key, _)| !query.is_empty() && truthy(key))
        .map(|(_, operation)| operation)
}

/// Whether a `method` request to `target` on `route` must have its body read for an
/// override field: it is a POST (the only method the frameworks override) and the rule
/// refuses some other method there.
pub fn body_matters(route: &Route, method: &str, target: &str) -> bool {
    method == "POST" && (route.request_allowed)(UNLISTED_METHOD, target).is_err()
}

/// How the frameworks that read overrides from a POST's body read this one: as a form
/// (Rack and PHP, by the media type), and as JSON (Laravel, by `/json` or `+json`
/// anywhere in `Content-Type`), each independently of the other.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Readings {
    /// `application/x-www-form-urlencoded`, or no media type (Rack parses a POST
    /// without one as a form).
    url_encoded: bool,
    /// `multipart/*` (Rack parses `form-data`, `mixed` and `related`; PHP `form-data`).
    multipart: bool,
    /// Laravel reads the body as JSON.
    json: bool,
}

impl Readings {
    fn any(self) -> bool {
        self.url_encoded || self.multipart || self.json
    }

    fn of(headers: &HeaderMap) -> Result<Self, String> {
        let mut types = headers.get_all(CONTENT_TYPE).iter();
        let (first, second) = (types.next(), types.next());
        if second.is_some() {
            return Err("several Content-Type headers".to_owned());
        }
        let Some(value) = first else {
            return Ok(Self {
                url_encoded: true,
                ..Self::default()
            });
        };
        let value = value
            .to_str()
            .map_err(|_| "a Content-Type that is not ASCII".to_owned())?
            .to_ascii_lowercase();
        // Cut as Rack (at `;` or `,`) and PHP (also at white space) cut it.
        let media = value
            .trim_start()
            .split(|c: char| c == ';' || c == ',' || c.is_ascii_whitespace())
            .next()
            .unwrap_or("");
        let readings = Self {
            url_encoded: media.is_empty() || media == "application/x-www-form-urlencoded",
            multipart: media.starts_with("multipart/"),
            json: value.contains("/json") || value.contains("+json"),
        };
        // A form in another character set hides its keys from a byte-wise reading
        // (Tomcat and ASP.NET decode the charset the request names), as does JSON in
        // one (Express decodes any UTF charset).
        if readings.url_encoded || readings.multipart || readings.json {
            // (ASP.NET finds the parameter after `,` or white space too, and .NET's
            // parser allows white space around `=`.)
            let squeezed = value
                .split('=')
                .map(|part| part.trim_matches([' ', '\t']))
                .collect::<Vec<_>>()
                .join("=");
            if let Some(charset) = squeezed
                .split([';', ',', ' ', '\t'])
                .skip(1)
                .filter_map(|p| p.split_once('='))
                .find(|(k, _)| k.trim().eq_ignore_ascii_case("charset"))
                .map(|(_, v)| v.trim().trim_matches('"').to_owned())
            {
                if !matches!(
                    charset.as_str(),
                    "utf-8" | "utf8" | "us-ascii" | "ascii" | "iso-8859-1" | "latin1"
                ) {
                    return Err(format!("a body in charset {charset:?}"));
                }
            }
        }
        Ok(readings)
    }
}

/// The outcome of [`check_body`].
#[derive(Debug)]
pub enum BodyCheck {
    /// No override: forward these bytes (the whole body, read) first, keeping what they
    /// hold of the budget until they are sent.
    Forward(Bytes, Option<HeldBody>),
    /// Refused: why, and how many bytes of the body were read.
    Refuse { reason: String, consumed: u64 },
    /// The client's body failed or stalled.
    Downstream(String),
    /// The sandbox (or the daemon) holds its most of such bodies already: why, and how
    /// many bytes of the body were read.
    Busy { reason: String, consumed: u64 },
}

/// Reads a POST body that frameworks parse (form, multipart or JSON) and refuses it if
/// it holds an override field; any other body is left unread (`Forward` of nothing).
/// `held` is the sandbox's share of the bytes such reads hold ([`sandbox_share`]).
pub async fn check_body(
    headers: &HeaderMap,
    body: &mut Incoming,
    idle: Duration,
    held: &Arc<Semaphore>,
) -> BodyCheck {
    let refuse = |why: String, consumed| BodyCheck::Refuse {
        reason: format!(
            "downstream client: POST refused: {why} (the rule refuses other methods here, \
             and frameworks run the method a POST body names)"
        ),
        consumed,
    };
    let readings = match Readings::of(headers) {
        Ok(readings) if readings.any() => readings,
        Ok(_) => return BodyCheck::Forward(Bytes::new(), None),
        Err(why) => return refuse(format!("{why} cannot be checked for a method override"), 0),
    };
    if body.is_end_stream() {
        return BodyCheck::Forward(Bytes::new(), None);
    }
    let encoded = headers
        .get_all(CONTENT_ENCODING)
        .iter()
        .any(|v| !v.as_bytes().trim_ascii().eq_ignore_ascii_case(b"identity"));
    if encoded {
        return refuse(
            "a form or JSON body with a Content-Encoding cannot be checked for a method \
             override"
                .to_owned(),
            0,
        );
    }
    let (read, kept) = match read_whole(body, idle, held).await {
        Ok(read) => read,
        Err(ReadError::TooLarge(consumed)) => {
            return refuse(
                format!(
                    "a form or JSON body over {MAX_FORM_BYTES} bytes cannot be checked for a \
                     method override"
                ),
                consumed,
            )
        }
        Err(ReadError::Trailers(consumed)) => {
            return refuse(
                "a form or JSON body with trailers cannot be checked for a method override"
                    .to_owned(),
                consumed,
            )
        }
        Err(ReadError::Downstream(why)) => return BodyCheck::Downstream(why),
        Err(ReadError::Busy(spent, consumed)) => {
            let (who, most) = match spent {
                Spent::Sandbox => ("the sandbox", MAX_HELD_PER_SANDBOX),
                Spent::Daemon => ("the daemon", MAX_HELD_BYTES),
            };
            return BodyCheck::Busy {
                reason: format!(
                    "proxy: POST refused: {who} already holds {} MiB of request bodies read \
                     whole to be checked for a method override ({consumed} bytes of this one \
                     read); try again",
                    most >> 20
                ),
                consumed,
            };
        }
    };
    let json = readings.json.then(|| json_keys(&read));
    let found = [
        readings
            .url_encoded
            .then(|| form_keys(&read).find(|key| is_override_key(key)))
            .flatten(),
        readings
            .multipart
            .then(|| {
                multipart_names(&read).find(|name| name == ENCODED_NAME || is_override_key(name))
            })
            .flatten(),
        // (No depth or number hides a key: this parser skips values rather than build
        // them.)
        json.as_ref()
            .and_then(|keys| keys.as_ref().ok())
            .and_then(|keys| keys.iter().find(|k| is_override_key(k)).cloned()),
    ]
    .into_iter()
    .flatten()
    .next();
    // JSON behind a byte order mark (or with NULs: UTF-16 without one) is not read here,
    // while Express drops the mark and decodes the charset it names: refused, not
    // forwarded unread. (Another charset named is refused with the type, above.)
    let marked = [&b"\xEF\xBB\xBF"[..], b"\xFE\xFF", b"\xFF\xFE"]
        .iter()
        .any(|bom| read.starts_with(bom));
    if found.is_none() && readings.json && (marked || read.contains(&0)) {
        return refuse(
            "a JSON body with a byte order mark or NUL bytes (another encoding than UTF-8) \
             may name a method to run instead"
                .to_owned(),
            read.len() as u64,
        );
    }
    // Any other JSON this parser refuses (a lone surrogate escape, a key that is not
    // UTF-8) is
    // read by lenient ones (Express decodes bytes loosely, `JSON.parse` takes lone
    // surrogates) with whatever keys it holds: refused, not forwarded unread. An empty
    // body holds no keys for any of them.
    if found.is_none() && matches!(json, Some(Err(_))) && !read.trim_ascii().is_empty() {
        return refuse(
            "a JSON body this proxy cannot parse strictly may name a method to run instead \
             (lenient parsers read it)"
                .to_owned(),
            read.len() as u64,
        );
    }
    match found {
        Some(key) if key == ENCODED_NAME => refuse(
            "a multipart field name in pieces (RFC 2231) or in an encoded word (RFC 2047), \
             which origins join and decode each their own way, may name a method to run \
             instead"
                .to_owned(),
            read.len() as u64,
        ),
        Some(key) => refuse(
            format!("body field {key:?} names a method to run instead"),
            read.len() as u64,
        ),
        None => BodyCheck::Forward(read, kept),
    }
}

enum ReadError {
    TooLarge(u64),
    Trailers(u64),
    Downstream(String),
    Busy(Spent, u64),
}

/// The whole body, at most [`MAX_FORM_BYTES`], within [`MAX_FORM_SECS`] (a byte now and
/// then must not hold the buffer for ever).
async fn read_whole(
    body: &mut Incoming,
    idle: Duration,
    held: &Arc<Semaphore>,
) -> Result<(Bytes, Option<HeldBody>), ReadError> {
    let mut read = BytesMut::new();
    let whole = tokio::time::timeout(
        Duration::from_secs(MAX_FORM_SECS),
        read_into(body, idle, &mut read, held),
    );
    match whole.await {
        Ok(done) => done,
        Err(_) => Err(ReadError::Downstream(format!(
            "downstream client: a form or JSON body read whole before forwarding took over \
             {MAX_FORM_SECS} s ({} bytes read)",
            read.len()
        ))),
    }
}

async fn read_into(
    body: &mut Incoming,
    idle: Duration,
    read: &mut BytesMut,
    share: &Arc<Semaphore>,
) -> Result<(Bytes, Option<HeldBody>), ReadError> {
    // Given back when the read fails, or when the body read is sent.
    let mut held = Held::new(share);
    loop {
        match next_piece(body, idle).await {
            Ok(Piece::End) => return Ok((std::mem::take(read).freeze(), held.into_body())),
            Ok(Piece::Data(data)) => {
                if read.len() + data.len() > MAX_FORM_BYTES {
                    return Err(ReadError::TooLarge((read.len() + data.len()) as u64));
                }
                // The room is charged before it is taken: what the buffer growing may
                // make (twice what it had, or what is needed), then what it made.
                let need = read.len() + data.len();
                let grown = if need > read.capacity() {
                    need.max(2 * read.capacity())
                } else {
                    0
                };
                let charged = held.grow_to(grown).and_then(|()| {
                    read.reserve(data.len());
                    held.grow_to(read.capacity())
                });
                if let Err(spent) = charged {
                    // The piece was taken off the body (a `100 Continue` was sent for it).
                    return Err(ReadError::Busy(spent, need as u64));
                }
                read.extend_from_slice(&data);
            }
            Ok(Piece::Trailers) => return Err(ReadError::Trailers(read.len() as u64)),
            Err(why) => return Err(ReadError::Downstream(why)),
        }
    }
}

/// Whether `key`, as a framework decoded it, names a method override: `_method`, or an
/// override header's name (dashes or underscores), any case. Read as PHP names a
/// variable too (leading spaces dropped, `.` and spaces read as `_`, an array's `[`
/// ending the name), and with its leading spaces kept as `_`.
fn is_override_key(key: &str) -> bool {
    // PHP reads a name up to a NUL; a decoder might drop NULs instead.
    let cut = key.split('\0').next().unwrap_or("");
    let dropped = key.replace('\0', "");
    let named = |name: &str| {
        let name = name
            .split('[')
            .next()
            .unwrap_or("")
            .replace(['.', ' '], "_");
        name.eq_ignore_ascii_case("_method")
            || crate::credentials::OVERRIDE_HEADERS.iter().any(|h| {
                name.eq_ignore_ascii_case(&h.replace('-', "_")) || name.eq_ignore_ascii_case(h)
            })
    };
    // Rack 2 (Rails up to 7.0) reads a name from its first run of characters other than
    // brackets (`[_method]`, `]_method` and `_method]` are `_method`), and qs (Express)
    // unwraps a bracketed root name.
    let unbracketed = |name: &str| -> String {
        name.trim_start_matches(['[', ']'])
            .split(['[', ']'])
            .next()
            .unwrap_or("")
            .to_owned()
    };
    [cut, dropped.as_str()]
        .iter()
        .any(|key| named(key) || named(key.trim_start_matches(' ')) || named(&unbracketed(key)))
}

/// The pairs of a query, keys and values decoded as [`form_keys`] decodes keys (a pair
/// without `=` has an empty value).
pub fn query_pairs(query: &str) -> impl Iterator<Item = (String, String)> + '_ {
    query
        .as_bytes()
        .split(|&b| b == b'&' || b == b';')
        .map(|pair| {
            let mut parts = pair.splitn(2, |&b| b == b'=');
            let key = form_decode(parts.next().unwrap_or(b""));
            let value = form_decode(parts.next().unwrap_or(b""));
            (key, value)
        })
}

/// The keys of an `application/x-www-form-urlencoded` text (or query), decoded: pairs
/// split at `&` and `;` (older Rack), `+` read as a space, then percent-decoded.
fn form_keys(text: &[u8]) -> impl Iterator<Item = String> + '_ {
    text.split(|&b| b == b'&' || b == b';').map(|pair| {
        let key = pair.split(|&b| b == b'=').next().unwrap_or(b"");
        form_decode(key)
    })
}

/// A form field's name or value decoded: `+` read as a space, `%HH` as that byte, and
/// `%uXXXX` as that character, as ASP.NET (System.Web) decodes it.
fn form_decode(raw: &[u8]) -> String {
    let text = String::from_utf8_lossy(raw);
    let mut unicode = String::with_capacity(text.len());
    let mut rest = text.as_ref();
    while let Some(at) = rest.find("%u").or_else(|| rest.find("%U")) {
        let code = rest
            .get(at + 2..at + 6)
            .filter(|h| h.bytes().all(|b| b.is_ascii_hexdigit()))
            .and_then(|h| u32::from_str_radix(h, 16).ok())
            .and_then(char::from_u32);
        unicode.push_str(&rest[..at]);
        match code {
            // Percent-encoded again, so that the byte decoding below reads it as itself.
            Some(c) => {
                let mut buf = [0u8; 4];
                for b in c.encode_utf8(&mut buf).bytes() {
                    unicode.push_str(&format!("%{b:02X}"));
                }
                rest = &rest[at + 6..];
            }
            None => {
                unicode.push_str(&rest[at..at + 2]);
                rest = &rest[at + 2..];
            }
        }
    }
    unicode.push_str(rest);
    // (`percent_decode` reads `+` as a space, as form decoding does.)
    String::from_utf8_lossy(&super::inject::percent_decode(&unicode)).into_owned()
}

/// What [`multipart_names`] gives for a field name written in a form some origins decode
/// and others do not, each its own way (RFC 2231 pieces, which Go's `mime` joins; RFC 2047
/// encoded words, which Tomcat and ASP.NET Core decode, in any charset): not a name any
/// form field has (it holds a NUL), and the body is refused for it rather than judged by
/// one reading of it.
const ENCODED_NAME: &str = "\0encoded name";

/// Every `name` (and `name*`, RFC 5987) parameter value anywhere in a multipart body,
/// read loosely (any case, spaces around `=`, quoted or not, `filename` too): a field's
/// name is among them however its part's headers are laid out. A field name in pieces
/// (`name*0=...`) or holding an encoded word (`=?UTF-8?B?...?=`) is [`ENCODED_NAME`].
fn multipart_names(body: &[u8]) -> impl Iterator<Item = String> + '_ {
    let starts = body
        .windows(4)
        .enumerate()
        .filter(|(_, w)| w.eq_ignore_ascii_case(b"name"))
        .map(|(i, _)| i);
    starts.filter_map(move |at| {
        // `name` itself, not the end of `filename` (or another parameter's name).
        let own = at == 0 || !body[at - 1].is_ascii_alphanumeric();
        let param = multipart_param(body, at + 4)?;
        if param.piece.is_some() {
            return own.then(|| ENCODED_NAME.to_owned());
        }
        let value = if param.extended {
            // charset'language'percent-encoded
            let encoded = param.value.splitn(3, '\'').nth(2).unwrap_or(&param.value);
            String::from_utf8_lossy(&super::inject::percent_decode(encoded)).into_owned()
        } else {
            param.value
        };
        Some(if own && value.contains("=?") {
            ENCODED_NAME.to_owned()
        } else {
            value
        })
    })
}

/// One `name` parameter of a multipart body, after its key.
struct MultipartParam {
    /// `name*N` (RFC 2231 continuation): N.
    piece: Option<u32>,
    /// Percent-encoded (`name*=`, `name*N*=`).
    extended: bool,
    value: String,
}

/// The parameter whose key ends at `i` (`name`, `name*`, `name*N`, `name*N*`), read as
/// loosely as PHP does (any white space, line breaks included, around `*` and `=`;
/// quoted with `"` or `'`, backslash escapes, or bare to `;`, `,` or white space).
fn multipart_param(body: &[u8], mut i: usize) -> Option<MultipartParam> {
    let skip_spaces = |i: &mut usize| {
        while body
            .get(*i)
            .is_some_and(|b| b.is_ascii_whitespace() || *b == 0x0b)
        {
            *i += 1;
        }
    };
    skip_spaces(&mut i);
    let mut piece = None;
    let mut extended = false;
    if body.get(i) == Some(&b'*') {
        i += 1;
        skip_spaces(&mut i);
        let digits = body[i..].iter().take_while(|b| b.is_ascii_digit()).count();
        if digits > 0 {
            // More digits than a piece number has: no name, refused.
            let n = std::str::from_utf8(&body[i..i + digits])
                .ok()?
                .parse()
                .unwrap_or(u32::MAX);
            piece = Some(n);
            i += digits;
            skip_spaces(&mut i);
            if body.get(i) == Some(&b'*') {
                extended = true;
                i += 1;
                skip_spaces(&mut i);
            }
        } else {
            extended = true;
        }
    }
    if body.get(i) != Some(&b'=') {
        return None;
    }
    i += 1;
    skip_spaces(&mut i);
    let rest = &body[i..];
    let value: Vec<u8> = match rest.first() {
        // Quoted, to the closing quote (a name is short: at most a line's worth is read).
        Some(&quote) if quote == b'"' || quote == b'\'' => {
            let mut out = Vec::new();
            let mut bytes = rest[1..].iter().take(4096);
            while let Some(&b) = bytes.next() {
                match b {
                    b'\\' => out.extend(bytes.next()),
                    b if b == quote => break,
                    _ => out.push(b),
                }
            }
            out
        }
        _ => rest
            .iter()
            .take_while(|&&b| !(b == b';' || b == b',' || b.is_ascii_whitespace() || b == 0x0b))
            .copied()
            .collect(),
    };
    Some(MultipartParam {
        piece,
        extended,
        value: String::from_utf8_lossy(&value).into_owned(),
    })
}

/// The keys of the top-level object of a JSON body's first value (none if it is another
/// value: no framework reads fields from it then). Values are skipped, not built: a
/// number out of `f64`'s range or nesting deeper than a parser's limit does not hide a
/// key. What follows the first value is not read: a parser that reads one value takes
/// those keys, one that reads the whole body fails on it. `Err`: the first value is not
/// strict JSON, which a lenient parser may still read keys from (the caller refuses).
fn json_keys(body: &[u8]) -> Result<Vec<String>, serde_json::Error> {
    use serde::de::{Deserializer as _, IgnoredAny, MapAccess, Visitor};
    struct TopKeys;
    impl<'de> Visitor<'de> for TopKeys {
        type Value = Vec<String>;
        fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("a JSON value")
        }
        fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
            let mut keys = Vec::new();
            while let Some(key) = map.next_key::<String>()? {
                map.next_value::<IgnoredAny>()?;
                keys.push(key);
            }
            Ok(keys)
        }
        fn visit_seq<A: serde::de::SeqAccess<'de>>(
            self,
            mut seq: A,
        ) -> Result<Self::Value, A::Error> {
            while seq.next_element::<IgnoredAny>()?.is_some() {}
            Ok(Vec::new())
        }
        fn visit_bool<E>(self, _: bool) -> Result<Self::Value, E> {
            Ok(Vec::new())
        }
        fn visit_i64<E>(self, _: i64) -> Result<Self::Value, E> {
            Ok(Vec::new())
        }
        fn visit_u64<E>(self, _: u64) -> Result<Self::Value, E> {
            Ok(Vec::new())
        }
        fn visit_f64<E>(self, _: f64) -> Result<Self::Value, E> {
            Ok(Vec::new())
        }
        fn visit_str<E>(self, _: &str) -> Result<Self::Value, E> {
            Ok(Vec::new())
        }
        fn visit_unit<E>(self) -> Result<Self::Value, E> {
            Ok(Vec::new())
        }
    }
    let mut de = serde_json::Deserializer::from_slice(body);
    (&mut de).deserialize_any(TopKeys)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn override_keys_are_read_as_the_frameworks_read_them() {
        for key in [
            "_method",
            "_METHOD",
            " _method",
            "_method[]",
            " method",
            "x-http-method-override",
            "X_HTTP_METHOD_OVERRIDE",
        ] {
            assert!(is_override_key(key), "{key:?}");
        }
        for key in ["method", "x_method", "payment_method", "__method", ""] {
            assert!(!is_override_key(key), "{key:?}");
        }
    }

    #[test]
    fn query_overrides_in_every_spelling_are_found() {
        for query in [
            "_method=DELETE",
            "a=1&_method=PUT",
            "a=1;_method=DELETE",
            "%5Fmethod=DELETE",
            "_Method=x",
            "_method",
            // PHP: leading spaces dropped, `.` and spaces read as `_`.
            "+_method=DELETE",
            "%20_method=DELETE",
            "+method=DELETE",
            ".method=DELETE",
            "+method.=x&%2Emethod=DELETE",
            "_method[]=DELETE",
            "_method%00=DELETE",
            "_method%00x=DELETE",
            "x-http-method-override=DELETE",
        ] {
            assert!(in_query(&format!("/x?{query}")).is_some(), "{query:?}");
        }
        for query in ["method=x", "x_method=1", "a=_method", "+x_method=1"] {
            assert_eq!(in_query(&format!("/x?{query}")), None, "{query:?}");
        }
        assert_eq!(in_query("/_method"), None);
    }

    #[test]
    fn multipart_field_names_are_found_however_written() {
        let part = |disposition: &str| {
            format!("--b\r\nContent-Disposition: {disposition}\r\n\r\nDELETE\r\n--b--\r\n")
        };
        for disposition in [
            "form-data; name=\"_method\"",
            "form-data; name=_method",
            "form-data;NAME = \"_method\"",
            "form-data; name=\"_me\\thod\"",
            "form-data; name*=UTF-8''%5Fmethod",
            "form-data; name=\" _method\"",
            // As PHP reads them: single quotes, any white space, a continuation line.
            "form-data; name='_method'",
            "form-data; name=\u{b}\"_method\"",
            "form-data; name=\r\"_method\"",
            "form-data; name=\r\n \"_method\"",
            "form-data; name=\"_method\u{0}x\"",
        ] {
            let body = part(disposition);
            assert!(
                multipart_names(body.as_bytes()).any(|n| is_override_key(&n)),
                "{disposition:?}"
            );
        }
        let body = part("form-data; name=\"payment_method\"");
        assert!(!multipart_names(body.as_bytes()).any(|n| is_override_key(&n)));
        // Names origins join or decode each their own way: refused, whatever they read
        // as (Go joins RFC 2231 pieces; Tomcat and ASP.NET Core decode RFC 2047 words).
        for disposition in [
            "form-data; name*0=\"_met\"; name*1=\"hod\"",
            "form-data; name*1=\"hod\"; name*0=\"_met\"",
            "form-data; name*0*=UTF-8''%5Fme; name*1=thod",
            "form-data; name * 0 = \"_met\";\r\n name*1=hod",
            "form-data; name*0=\"long-\"; name*1=\"field\"",
            "form-data; name=\"=?UTF-8?B?X21ldGhvZA==?=\"",
            "form-data; name==?UTF-8?Q?=5Fmethod?=",
            "form-data; name=\"=?utf-8?Q?=5Fmet?= =?utf-8?Q?hod?=\"",
            "form-data; name=\"=?UTF-16?B?AF8AbQBlAHQAaABvAGQ=?=\"",
        ] {
            let body = part(disposition);
            assert!(
                multipart_names(body.as_bytes()).any(|n| n == ENCODED_NAME),
                "{disposition:?}"
            );
        }
        // Ordinary uploads: a file name in an encoded word (.NET writes them) or in pieces.
        for disposition in [
            "form-data; name=\"file\"; filename=\"=?utf-8?B?w6l0w6kucGRm?=\"",
            "form-data; name=\"file\"; filename*0=\"a-long-\"; filename*1=\"name.pdf\"",
            "form-data; name=\"a=b\"",
        ] {
            let body = part(disposition);
            let names: Vec<String> = multipart_names(body.as_bytes()).collect();
            assert!(
                !names
                    .iter()
                    .any(|n| n == ENCODED_NAME || is_override_key(n)),
                "{disposition:?}: {names:?}"
            );
        }
    }

    #[test]
    fn json_top_level_keys_are_read() {
        let found =
            |body: &str| json_keys(body.as_bytes()).map(|k| k.iter().any(|k| is_override_key(k)));
        assert_eq!(found(r#"{"a":1,"_method":"DELETE"}"#).ok(), Some(true));
        assert_eq!(found(r#"{"\u005fmethod":"DELETE"}"#).ok(), Some(true));
        assert_eq!(found(r#"{"a":{"_method":"DELETE"}}"#).ok(), Some(false));
        assert_eq!(found("[1]").ok(), Some(false));
        assert_eq!(found(" 3 ").ok(), Some(false));
        // Values a parser building them would refuse do not hide the key.
        let deep = format!(
            r#"{{"_method":"DELETE","p":{}{}}}"#,
            "[".repeat(200),
            "]".repeat(200)
        );
        assert_eq!(found(&deep).ok(), Some(true));
        assert_eq!(found(r#"{"_method":"DELETE","n":1e400}"#).ok(), Some(true));
        // Not JSON: an error (refused by the caller), not "no keys": a lone surrogate
        // (`JSON.parse` takes it) or a key that is not UTF-8 (Express decodes it
        // loosely) hides nothing.
        assert!(found(r#"{"_method":"DELETE""#).is_err());
        assert!(found(r#"{"\ud800":0,"_method":"DELETE"}"#).is_err());
        assert!(json_keys(b"{\"\xff\":0,\"_method\":\"DELETE\"}").is_err());
        // The first value's keys, whatever follows it.
        assert_eq!(found(r#"{"a":1} x"#).ok(), Some(false));
        assert_eq!(found("{\"_method\":\"DELETE\"}\n{}").ok(), Some(true));
    }

    #[test]
    fn readings_follow_the_content_type() {
        let readings = |ct: Option<&str>| {
            let mut h = HeaderMap::new();
            if let Some(ct) = ct {
                h.insert(CONTENT_TYPE, ct.parse().unwrap_or_else(|_| unreachable!()));
            }
            Readings::of(&h)
        };
        let form = Readings {
            url_encoded: true,
            ..Readings::default()
        };
        let multipart = Readings {
            multipart: true,
            ..Readings::default()
        };
        let json = Readings {
            json: true,
            ..Readings::default()
        };
        assert_eq!(readings(None), Ok(form));
        assert_eq!(readings(Some("")), Ok(form));
        assert_eq!(
            readings(Some("Application/X-WWW-Form-Urlencoded ; charset=utf-8")),
            Ok(form)
        );
        assert_eq!(
            readings(Some("multipart/form-data; boundary=b")),
            Ok(multipart)
        );
        assert_eq!(readings(Some("multipart/mixed")), Ok(multipart));
        assert_eq!(readings(Some("application/json")), Ok(json));
        assert_eq!(readings(Some("application/vnd.api+json")), Ok(json));
        for cut in [
            "application/x-www-form-urlencoded,x",
            "application/x-www-form-urlencoded x",
            " application/x-www-form-urlencoded;x",
        ] {
            assert_eq!(readings(Some(cut)), Ok(form), "{cut:?}");
        }
        // Laravel reads JSON wherever `/json` or `+json` appears: both readings apply.
        for both in [
            "application/x-www-form-urlencoded, application/json",
            "application/x-www-form-urlencoded; x=+json",
        ] {
            assert_eq!(
                readings(Some(both)),
                Ok(Readings {
                    url_encoded: true,
                    json: true,
                    ..Readings::default()
                }),
                "{both:?}"
            );
        }
        assert_eq!(
            readings(Some("multipart/form-data; boundary=a+json")),
            Ok(Readings {
                multipart: true,
                json: true,
                ..Readings::default()
            })
        );
        assert!(!readings(Some("application/octet-stream"))
            .unwrap_or_default()
            .any());
        assert!(!readings(Some("application/x-git-receive-pack-request"))
            .unwrap_or_default()
            .any());
        // A form in a charset that hides its keys from a byte-wise reading.
        assert!(readings(Some("application/x-www-form-urlencoded; charset=UTF-16LE")).is_err());
        for spaced in [
            "application/x-www-form-urlencoded; charset = utf-16",
            "application/x-www-form-urlencoded;charset\t=utf-16",
            "application/json; charset= utf-32",
        ] {
            assert!(readings(Some(spaced)).is_err(), "{spaced}");
        }
        assert_eq!(
            readings(Some("application/x-www-form-urlencoded; charset = utf-8")),
            Ok(form)
        );
        assert_eq!(
            readings(Some("application/x-www-form-urlencoded; charset=\"UTF-8\"")),
            Ok(form)
        );
        let mut two = HeaderMap::new();
        two.append(CONTENT_TYPE, http::HeaderValue::from_static("text/plain"));
        two.append(
            CONTENT_TYPE,
            http::HeaderValue::from_static("application/json"),
        );
        assert!(Readings::of(&two).is_err());
    }
}
