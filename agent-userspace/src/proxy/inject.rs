//! The injection forms the proxy applies to the request itself, beside headers:
//!
//! - **query**: the judged target (normalised once) gets the credential as one query
//!   parameter; any parameter the sandbox sent under that name (also percent-encoded)
//!   is removed first, and one whose name a server could take for it (case, `[]`, `.`
//!   or space for `_`, a `;` separator) refuses the request. That target is what is
//!   forwarded. The audit record keeps query keys only, so the value never reaches it.
//! - **placeholder**: the sandbox's sentinel for the rule's credential is replaced by the
//!   value only where the credential's `inject.placeholder` allows: `Authorization`
//!   (also inside an HTTP Basic value) and the headers it lists, the values of the query
//!   parameters it lists, and the body (as it streams; the framing becomes chunked or
//!   HTTP/2 DATA without a length) only with `body: true`. A compressed request body is
//!   then refused, as the sentinel in it could not be replaced. A sentinel anywhere
//!   else, or of any placeholder credential other than the rule's own at one of its
//!   hosts, refuses the request (403), before anything is sent or, in a body, before the
//!   piece holding it is sent: it is never forwarded as it is.

use base64::Engine as _;
use bytes::Bytes;
use http::header::{CONTENT_ENCODING, CONTENT_TYPE};
use http::{HeaderMap, HeaderName, HeaderValue};
use zeroize::Zeroizing;

use super::scrub::OutboundScan;
use crate::credentials::{Secret, StreamReplacer, OVERRIDE_HEADERS};

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Every byte outside RFC 3986's unreserved set as `%XX`.
pub(super) fn percent_encode(value: &str) -> Zeroizing<String> {
    let mut out = Zeroizing::new(String::with_capacity(value.len() * 3));
    for &b in value.as_bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Percent-decodes `s` for comparison (invalid escapes stay as they are).
pub(super) fn percent_decode(s: &str) -> Vec<u8> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let hex = |c: u8| (c as char).to_digit(16);
        if b[i] == b'%' && i + 2 < b.len() {
            if let (Some(h), Some(l)) = (hex(b[i + 1]), hex(b[i + 2])) {
                out.push((h * 16 + l) as u8);
                i += 3;
                continue;
            }
        }
        out.push(if b[i] == b'+' { b' ' } else { b[i] });
        i += 1;
    }
    out
}

/// A query key as servers may read it, for comparison: decoded, ASCII lower case,
/// leading spaces dropped, cut at the first `[` (`key[]`, `key[0]`), `.` and space read
/// as `_` (as PHP does).
fn loose_key(key: &[u8]) -> Vec<u8> {
    let start = key.iter().position(|&b| b != b' ').unwrap_or(key.len());
    let key = &key[start..];
    let end = key.iter().position(|&b| b == b'[').unwrap_or(key.len());
    key[..end]
        .iter()
        .map(|&b| match b {
            b'.' | b' ' => b'_',
            b => b.to_ascii_lowercase(),
        })
        .collect()
}

/// `target` (a normalised path and query) with every `param` parameter removed (by its
/// exact decoded name) and `param=<value, percent-encoded>` appended. A key that is not
/// `param` but that a server could read as it ([`loose_key`], or `param` before a `;`)
/// is an error: which of the two the origin would use cannot be known.
pub(super) fn set_query_param(
    target: &str,
    param: &str,
    value: &Secret,
) -> Result<Zeroizing<String>, String> {
    let (path, query) = match target.split_once('?') {
        Some((p, q)) => (p, q),
        None => (target, ""),
    };
    let loose_param = loose_key(param.as_bytes());
    let mut out = Zeroizing::new(String::with_capacity(target.len() + param.len() + 64));
    out.push_str(path);
    out.push('?');
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let key = pair.split_once('=').map_or(pair, |(k, _)| k);
        if percent_decode(key) == param.as_bytes() {
            continue;
        }
        let confusable = pair.split(';').any(|part| {
            let key = part.split_once('=').map_or(part, |(k, _)| k);
            loose_key(&percent_decode(key)) == loose_param
        });
        if confusable {
            return Err(format!(
                "downstream client: a query parameter could be read as `{param}`, which the \
                 proxy sets: send it under its exact name or not at all (key `{}`)",
                crate::text::sanitize(key, 60)
            ));
        }
        out.push_str(pair);
        out.push('&');
    }
    out.push_str(param);
    out.push('=');
    out.push_str(&percent_encode(value.expose()));
    Ok(out)
}

/// Headers that frame or route the request: a sentinel in them is never replaced.
fn framing(name: &HeaderName) -> bool {
    matches!(
        name.as_str(),
        "host"
            | "connection"
            | "content-length"
            | "transfer-encoding"
            | "te"
            | "trailer"
            | "upgrade"
            | "keep-alive"
            | "proxy-connection"
            | "proxy-authorization"
            | "proxy-authenticate"
    )
}

/// Why a value holding the sentinel cannot have it replaced.
#[derive(Debug, PartialEq, Eq)]
enum ValueFault {
    /// The sentinel is not the whole value (or the whole Basic user or password), so the
    /// sandbox would choose the text around the secret (and could shift it into what an
    /// origin echoes back).
    Shape,
    /// The secret cannot be put in a header.
    Value,
}

/// The authentication schemes a sentinel may follow: a scheme of the sandbox's choosing
/// (`AAAAAAAA <sentinel>`) would let it slide the secret, a byte at a time, across the
/// cut of an origin that echoes the first N bytes of the header.
const TOKEN_SCHEMES: [&str; 2] = ["Bearer", "token"];

/// Whether `text` is the sentinel alone or behind a token scheme (`Bearer <sentinel>`,
/// `token <sentinel>`, in any case).
fn whole_or_after_scheme(text: &str, sentinel: &str) -> bool {
    text == sentinel
        || text
            .strip_suffix(sentinel)
            .and_then(|rest| rest.strip_suffix(' '))
            .is_some_and(|scheme| TOKEN_SCHEMES.iter().any(|s| s.eq_ignore_ascii_case(scheme)))
}

/// `value` with `sentinel` replaced by `secret`: the whole value, after a scheme, or the
/// whole user or password inside an HTTP Basic value (decoded, replaced, encoded again).
/// `None` when it holds no sentinel.
fn replace_in_value(
    value: &HeaderValue,
    sentinel: &str,
    secret: &Secret,
) -> Option<Result<HeaderValue, ValueFault>> {
    let bytes = value.as_bytes();
    let text = std::str::from_utf8(bytes).ok()?;
    let replaced: Zeroizing<String> = if text.contains(sentinel) {
        if !whole_or_after_scheme(text, sentinel) {
            return Some(Err(ValueFault::Shape));
        }
        Zeroizing::new(text.replace(sentinel, secret.expose()))
    } else {
        let (scheme, encoded) = text.split_once(' ')?;
        if !scheme.eq_ignore_ascii_case("basic") {
            return None;
        }
        let decoded = Zeroizing::new(
            base64::engine::general_purpose::STANDARD
                .decode(encoded.trim())
                .ok()?,
        );
        let decoded = std::str::from_utf8(&decoded).ok()?;
        if !decoded.contains(sentinel) {
            return None;
        }
        let whole_field = decoded.split_once(':').is_some_and(|(user, password)| {
            (user == sentinel && !password.contains(sentinel))
                || (password == sentinel && !user.contains(sentinel))
        });
        if !whole_field {
            return Some(Err(ValueFault::Shape));
        }
        let pair = Zeroizing::new(decoded.replace(sentinel, secret.expose()));
        let mut s = Zeroizing::new(format!("{scheme} "));
        base64::engine::general_purpose::STANDARD.encode_string(pair.as_bytes(), &mut s);
        s
    };
    Some(
        HeaderValue::from_str(&replaced)
            .map(|mut v| {
                v.set_sensitive(true);
                v
            })
            .map_err(|_| ValueFault::Value),
    )
}

/// Why the sentinel could not be replaced in a header.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum HeaderReplaceError {
    /// The header holding the sentinel has other values too.
    Ambiguous(HeaderName),
    /// The sentinel is not the header's whole value (nor follows a scheme, nor is the
    /// whole Basic user or password).
    Shape(HeaderName),
    /// The value cannot be put in a header.
    Value,
}

/// Takes out of `headers` each header allowed to carry the sentinel (`Authorization` and
/// `extra`, never a framing, hop-by-hop, `Connection`-listed or method/URL override
/// header) that holds it, with it replaced by `secret`, so that stripping the sandbox's
/// credential headers leaves it; the caller puts back exactly these afterwards. A header
/// holding the sentinel must have that one value only. Sentinels anywhere else stay, for
/// the caller to refuse.
pub(super) fn take_replaced_headers(
    headers: &mut HeaderMap,
    sentinel: &str,
    secret: &Secret,
    extra: &[HeaderName],
) -> Result<Vec<(HeaderName, HeaderValue)>, HeaderReplaceError> {
    let listed = super::scrub::header_tokens(headers, http::header::CONNECTION);
    let mut out = Vec::new();
    for name in std::iter::once(&http::header::AUTHORIZATION).chain(extra) {
        if framing(name)
            || OVERRIDE_HEADERS.contains(&name.as_str())
            || listed.iter().any(|t| t == name.as_str())
            || out.iter().any(|(n, _)| n == name)
        {
            continue;
        }
        let values: Vec<&HeaderValue> = headers.get_all(name).iter().collect();
        let Some(replaced) = values
            .iter()
            .find_map(|v| replace_in_value(v, sentinel, secret))
        else {
            continue;
        };
        if values.len() > 1 {
            return Err(HeaderReplaceError::Ambiguous(name.clone()));
        }
        let replaced = replaced.map_err(|fault| match fault {
            ValueFault::Shape => HeaderReplaceError::Shape(name.clone()),
            ValueFault::Value => HeaderReplaceError::Value,
        })?;
        headers.remove(name);
        out.push((name.clone(), replaced));
    }
    Ok(out)
}

/// The target with `sentinel` replaced by the percent-encoded `secret` in the values of
/// the query parameters `params` (by exact decoded name, in a `&`-separated pair holding
/// no `;`), and how many were replaced. The path and everything else are left as judged.
/// `Err(param)`: a listed parameter holds the sentinel and more (the sandbox would choose
/// the text around the secret).
pub(super) fn replace_in_query(
    target: &str,
    sentinel: &str,
    secret: &Secret,
    params: &[String],
) -> Result<(Zeroizing<String>, usize), String> {
    let Some((path, query)) = target.split_once('?') else {
        return Ok((Zeroizing::new(target.to_owned()), 0));
    };
    if !query.contains(sentinel) {
        return Ok((Zeroizing::new(target.to_owned()), 0));
    }
    let encoded = percent_encode(secret.expose());
    let mut count = 0;
    let mut out = Zeroizing::new(String::with_capacity(target.len() + 64));
    out.push_str(path);
    out.push('?');
    for (i, pair) in query.split('&').enumerate() {
        if i > 0 {
            out.push('&');
        }
        match pair.split_once('=') {
            Some((key, value))
                if !pair.contains(';')
                    && value.contains(sentinel)
                    && params.iter().any(|p| percent_decode(key) == p.as_bytes()) =>
            {
                if value != sentinel {
                    return Err(String::from_utf8_lossy(&percent_decode(key)).into_owned());
                }
                count += 1;
                out.push_str(key);
                out.push('=');
                out.push_str(&encoded);
            }
            _ => out.push_str(pair),
        }
    }
    Ok((out, count))
}

/// Why a request body cannot have its sentinel replaced: a `Content-Encoding` other than
/// identity.
pub(super) fn body_encoding_refusal(headers: &HeaderMap) -> Option<String> {
    let coding = headers
        .get_all(CONTENT_ENCODING)
        .iter()
        .map(|v| {
            String::from_utf8_lossy(v.as_bytes())
                .trim()
                .to_ascii_lowercase()
        })
        .find(|c| !c.is_empty() && c != "identity")?;
    Some(format!(
        "downstream client: request body has Content-Encoding `{}`; a placeholder in it could \
         not be replaced: send it unencoded",
        crate::text::sanitize(&coding, 40)
    ))
}

/// The bytes that replace the sentinel in a body of this content type: JSON-escaped in
/// JSON, percent-encoded in a form, as is elsewhere.
pub(super) fn body_replacement(headers: &HeaderMap, secret: &Secret) -> Zeroizing<Vec<u8>> {
    let ctype = headers
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_ascii_lowercase();
    let essence = ctype.split(';').next().unwrap_or("").trim();
    if essence == "application/json" || essence.ends_with("+json") {
        let quoted =
            Zeroizing::new(serde_json::Value::String(secret.expose().to_owned()).to_string());
        Zeroizing::new(quoted.as_bytes()[1..quoted.len() - 1].to_vec())
    } else if essence == "application/x-www-form-urlencoded" {
        Zeroizing::new(percent_encode(secret.expose()).as_bytes().to_vec())
    } else {
        Zeroizing::new(secret.expose().as_bytes().to_vec())
    }
}

/// Everything a request body passes through on its way upstream, in order: the scan
/// for secret values (which the sandbox must not hold), the guard against sentinels that
/// do not belong at this host, and the replacement of the rule's own sentinel.
#[derive(Default)]
pub struct RequestScan {
    pub secrets: Option<OutboundScan>,
    pub guard: Option<OutboundScan>,
    pub replace: Option<StreamReplacer>,
}

impl RequestScan {
    pub fn is_empty(&self) -> bool {
        self.secrets.is_none() && self.guard.is_none() && self.replace.is_none()
    }

    /// What may be sent of `piece` now, or an error when a scan stopped the body.
    pub fn push(&mut self, piece: &[u8]) -> Result<Bytes, BoxError> {
        let mut out = match &mut self.secrets {
            Some(s) => s.push(piece)?,
            None => Bytes::copy_from_slice(piece),
        };
        if let Some(guard) = &mut self.guard {
            out = guard.push(&out)?;
        }
        if let Some(replace) = &mut self.replace {
            out = Bytes::from(replace.push(&out));
        }
        Ok(out)
    }

    pub fn trailers(&mut self, trailers: &HeaderMap) -> Result<(), BoxError> {
        if let Some(s) = &mut self.secrets {
            s.trailers(trailers)?;
        }
        if let Some(guard) = &mut self.guard {
            guard.trailers(trailers)?;
        }
        // The rule's own sentinel is replaced in the body only: in a trailer it would go
        // out as it is, for an origin to keep or echo.
        if let Some(replace) = &self.replace {
            if trailers.iter().any(|(n, v)| {
                replace.occurs_in(n.as_str().as_bytes()) || replace.occurs_in(v.as_bytes())
            }) {
                return Err(
                    "request trailer carries the placeholder, which is replaced only in \
                            the body: upstream request aborted"
                        .into(),
                );
            }
        }
        Ok(())
    }

    /// The end of the body: what every stage held back.
    pub fn finish(&mut self) -> Result<Bytes, BoxError> {
        let mut out = match &mut self.secrets {
            Some(s) => s.finish()?,
            None => Bytes::new(),
        };
        if let Some(guard) = &mut self.guard {
            let mut all = guard.push(&out)?.to_vec();
            all.extend_from_slice(&guard.finish()?);
            out = Bytes::from(all);
        }
        if let Some(replace) = &mut self.replace {
            let mut all = replace.push(&out);
            all.extend(replace.finish());
            out = Bytes::from(all);
        }
        Ok(out)
    }

    /// Bytes held back now (for size hints).
    pub fn held(&self) -> usize {
        self.secrets.as_ref().map_or(0, OutboundScan::held)
            + self.guard.as_ref().map_or(0, OutboundScan::held)
    }

    /// Whether the body's length may change (the forwarded request must not keep the
    /// sandbox's `Content-Length`).
    pub fn resizes(&self) -> bool {
        self.replace.is_some()
    }
}

#[cfg(test)]
#[expect(clippy::unwrap_used, reason = "tests fail loudly")]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::credentials::SecretMatcher;
    use crate::proxy::scrub::OutboundHit;

    const SENTINEL: &str = "egress-placeholder-0123456789abcdef0123456789abcdef";

    fn secret(s: &str) -> Secret {
        Secret::new(s.to_owned())
    }

    #[test]
    fn the_query_parameter_replaces_the_sandboxs() {
        let s = secret("k3y/with+&=");
        assert_eq!(
            set_query_param("/v1/x", "api_key", &s).unwrap().as_str(),
            "/v1/x?api_key=k3y%2Fwith%2B%26%3D"
        );
        assert_eq!(
            set_query_param(
                "/v1/x?a=1&api_key=mine&api%5Fkey=also&b&api_keyx=2",
                "api_key",
                &s
            )
            .unwrap()
            .as_str(),
            "/v1/x?a=1&b&api_keyx=2&api_key=k3y%2Fwith%2B%26%3D"
        );
        assert_eq!(
            set_query_param("/?api_key", "api_key", &s)
                .unwrap()
                .as_str(),
            "/?api_key=k3y%2Fwith%2B%26%3D"
        );
        // Keys only reach the record: the value never does.
        let forwarded = set_query_param("/p?q=1", "api_key", &s).unwrap();
        let keys = crate::audit::query_keys(forwarded.split_once('?').map(|x| x.1));
        assert_eq!(keys.as_deref(), Some("q=&api_key="));
    }

    #[test]
    fn a_query_key_a_server_could_read_as_the_parameter_is_refused() {
        let s = secret("v");
        for variant in [
            "API_KEY=x",
            "Api_Key=x",
            "api_key[]=x",
            "api_key[0]=x",
            "api_key%5B%5D=x",
            "api.key=x",
            "api%2Ekey=x",
            "api+key=x",
            "api%20key=x",
            "%20api_key=x",
            "api_key;x=1",
            "a=1;api_key=x",
            "API.KEY[]=x",
        ] {
            let target = format!("/p?q=1&{variant}");
            let err = set_query_param(&target, "api_key", &s).unwrap_err();
            assert!(err.contains("api_key"), "{variant}: {err}");
        }
        // A parameter named with `.` matches its `_` spellings too.
        assert!(set_query_param("/p?api_key=1", "api.key", &s).is_err());
        // Different names stay.
        for other in ["api_keys=1", "apikey=1", "xapi_key=1", "api-key=1", "key=1"] {
            let target = format!("/p?{other}");
            let out = set_query_param(&target, "api_key", &s).unwrap();
            assert_eq!(out.as_str(), format!("/p?{other}&api_key=v"), "{other}");
        }
    }

    fn basic(pair: &str) -> HeaderValue {
        let encoded = base64::engine::general_purpose::STANDARD.encode(pair);
        HeaderValue::from_str(&format!("Basic {encoded}")).unwrap()
    }

    fn shown(taken: &[(HeaderName, HeaderValue)]) -> Vec<(String, String)> {
        taken
            .iter()
            .map(|(n, v)| (n.to_string(), v.to_str().unwrap().to_owned()))
            .collect()
    }

    #[test]
    fn only_authorization_and_listed_headers_are_replaced() {
        let s = secret("real-token-value");
        let x_api_key = HeaderName::from_static("x-api-key");
        let mut headers = HeaderMap::new();
        headers.insert(
            "authorization",
            HeaderValue::from_str(&format!("Bearer {SENTINEL}")).unwrap(),
        );
        headers.insert("x-api-key", HeaderValue::from_static(SENTINEL));
        headers.insert("x-other", HeaderValue::from_static(SENTINEL));
        headers.insert("x-plain", HeaderValue::from_static("nothing"));
        headers.insert("proxy-authorization", basic(&format!("u:{SENTINEL}")));
        let taken =
            take_replaced_headers(&mut headers, SENTINEL, &s, std::slice::from_ref(&x_api_key))
                .unwrap();
        assert_eq!(
            shown(&taken),
            [
                (
                    "authorization".to_owned(),
                    "Bearer real-token-value".to_owned()
                ),
                ("x-api-key".to_owned(), "real-token-value".to_owned()),
            ]
        );
        assert!(taken.iter().all(|(_, v)| v.is_sensitive()));
        // A header not listed keeps its sentinel (for the caller to refuse), as do proxy
        // headers; the rest stays.
        assert_eq!(headers.get("x-other").unwrap(), SENTINEL);
        assert!(headers.contains_key("proxy-authorization") && headers.contains_key("x-plain"));
        assert!(!headers.contains_key("authorization") && !headers.contains_key("x-api-key"));

        // Not listed: nothing taken.
        let mut h = HeaderMap::new();
        h.insert("x-api-key", HeaderValue::from_static(SENTINEL));
        assert!(take_replaced_headers(&mut h, SENTINEL, &s, &[])
            .unwrap()
            .is_empty());
        assert!(h.contains_key("x-api-key"));

        // Basic in Authorization.
        let mut h = HeaderMap::new();
        h.insert("authorization", basic(&format!("user:{SENTINEL}")));
        let taken = take_replaced_headers(&mut h, SENTINEL, &s, &[]).unwrap();
        let want = base64::engine::general_purpose::STANDARD.encode("user:real-token-value");
        assert_eq!(taken[0].1.to_str().unwrap(), format!("Basic {want}"));
        // A value that cannot be a header value is an error, not a split header.
        let mut h = HeaderMap::new();
        h.insert("authorization", HeaderValue::from_static(SENTINEL));
        assert_eq!(
            take_replaced_headers(&mut h, SENTINEL, &secret("a\r\nb"), &[]),
            Err(HeaderReplaceError::Value)
        );
    }

    #[test]
    fn a_second_value_beside_the_sentinel_is_refused_and_nothing_else_is_restored() {
        let s = secret("real-token-value");
        // The sandbox's own key as a second Authorization value.
        let mut h = HeaderMap::new();
        h.append(
            "authorization",
            HeaderValue::from_str(&format!("Bearer {SENTINEL}")).unwrap(),
        );
        h.append(
            "authorization",
            HeaderValue::from_static("Bearer sandbox-own"),
        );
        assert_eq!(
            take_replaced_headers(&mut h, SENTINEL, &s, &[]),
            Err(HeaderReplaceError::Ambiguous(http::header::AUTHORIZATION))
        );
        let x_api_key = HeaderName::from_static("x-api-key");
        let mut h = HeaderMap::new();
        h.append("x-api-key", HeaderValue::from_static("other"));
        h.append("x-api-key", HeaderValue::from_static(SENTINEL));
        assert_eq!(
            take_replaced_headers(&mut h, SENTINEL, &s, std::slice::from_ref(&x_api_key)),
            Err(HeaderReplaceError::Ambiguous(x_api_key.clone()))
        );
        // Override, hop-by-hop and Connection-listed headers are never taken, even when
        // listed, so stripping removes them.
        let listed = [
            HeaderName::from_static("x-http-method-override"),
            HeaderName::from_static("x-original-url"),
            HeaderName::from_static("connection"),
            HeaderName::from_static("te"),
            x_api_key.clone(),
        ];
        let mut h = HeaderMap::new();
        for name in &listed {
            h.insert(name.clone(), HeaderValue::from_static(SENTINEL));
        }
        h.append("connection", HeaderValue::from_static("x-api-key"));
        let taken = take_replaced_headers(&mut h, SENTINEL, &s, &listed).unwrap();
        assert!(taken.is_empty(), "{:?}", shown(&taken));
        assert_eq!(h.len(), 6);
    }

    #[test]
    fn the_sentinel_must_be_a_whole_value_or_field() {
        let s = secret("real-token-value");
        let auth = |v: &str| {
            let mut h = HeaderMap::new();
            h.insert("authorization", HeaderValue::from_str(v).unwrap());
            take_replaced_headers(&mut h, SENTINEL, &s, &[])
        };
        for ok in [
            SENTINEL.to_owned(),
            format!("Bearer {SENTINEL}"),
            format!("bearer {SENTINEL}"),
            format!("token {SENTINEL}"),
        ] {
            assert!(auth(&ok).is_ok_and(|t| t.len() == 1), "{ok}");
        }
        for shaped in [
            format!("Bearer AAAA{SENTINEL}"),
            // A scheme of the sandbox's choosing would slide the secret.
            format!("AAAAAAAAAAAAAAAAAAAA {SENTINEL}"),
            format!("Bearer. {SENTINEL}"),
            format!("Bearer {SENTINEL}{SENTINEL}"),
            format!("Bearer {SENTINEL} x"),
            format!("key={SENTINEL}"),
            format!("a b {SENTINEL}"),
        ] {
            assert_eq!(
                auth(&shaped),
                Err(HeaderReplaceError::Shape(http::header::AUTHORIZATION)),
                "{shaped}"
            );
        }
        let basic_of = |pair: &str| {
            let mut h = HeaderMap::new();
            h.insert("authorization", basic(pair));
            take_replaced_headers(&mut h, SENTINEL, &s, &[])
        };
        assert!(basic_of(&format!("x-access-token:{SENTINEL}")).is_ok());
        assert!(basic_of(&format!("{SENTINEL}:")).is_ok());
        for shaped in [
            format!("user:pad{SENTINEL}"),
            format!("{SENTINEL}:{SENTINEL}"),
            format!("u{SENTINEL}:x"),
        ] {
            assert_eq!(
                basic_of(&shaped),
                Err(HeaderReplaceError::Shape(http::header::AUTHORIZATION)),
                "{shaped}"
            );
        }
    }

    #[test]
    fn query_and_body_forms() {
        let s = secret("a\"b c");
        let params = ["k".to_owned()];
        let (out, n) = replace_in_query(
            &format!("/p{SENTINEL}?k={SENTINEL}&x=1&o={SENTINEL}&k=1;{SENTINEL}"),
            SENTINEL,
            &s,
            &params,
        )
        .unwrap();
        // Only in the value of `k`, never the path, another parameter or a `;` pair.
        assert_eq!(
            out.as_str(),
            format!("/p{SENTINEL}?k=a%22b%20c&x=1&o={SENTINEL}&k=1;{SENTINEL}")
        );
        assert_eq!(n, 1);
        let (out, n) = replace_in_query(&format!("/p?k={SENTINEL}"), SENTINEL, &s, &[]).unwrap();
        assert_eq!((out.as_str(), n), (format!("/p?k={SENTINEL}").as_str(), 0));
        let (out, n) =
            replace_in_query(&format!("/p?%6B={SENTINEL}"), SENTINEL, &s, &params).unwrap();
        assert_eq!((out.as_str(), n), ("/p?%6B=a%22b%20c", 1));
        // The sandbox may not choose text around the secret (or repeat it).
        for value in [
            format!("{SENTINEL}x{SENTINEL}"),
            format!("pad{SENTINEL}"),
            format!("{SENTINEL}{SENTINEL}"),
        ] {
            assert_eq!(
                replace_in_query(&format!("/p?k={value}"), SENTINEL, &s, &params),
                Err("k".to_owned())
            );
        }
        let mut h = HeaderMap::new();
        h.insert(
            CONTENT_TYPE,
            HeaderValue::from_static("application/json; charset=utf-8"),
        );
        assert_eq!(&body_replacement(&h, &s)[..], b"a\\\"b c");
        h.insert(
            CONTENT_TYPE,
            HeaderValue::from_static("application/x-www-form-urlencoded"),
        );
        assert_eq!(&body_replacement(&h, &s)[..], b"a%22b%20c");
        h.insert(CONTENT_TYPE, HeaderValue::from_static("text/plain"));
        assert_eq!(&body_replacement(&h, &s)[..], b"a\"b c");
        assert!(body_encoding_refusal(&h).is_none());
        h.insert(CONTENT_ENCODING, HeaderValue::from_static("gzip"));
        assert!(body_encoding_refusal(&h).unwrap().contains("gzip"));
        h.insert(CONTENT_ENCODING, HeaderValue::from_static("identity"));
        assert!(body_encoding_refusal(&h).is_none());
    }

    #[test]
    fn a_misdirected_sentinel_stops_the_body_before_it_is_sent() {
        let guard_hit = Arc::new(OutboundHit::default());
        let matcher = Arc::new(SecretMatcher::new([("api", SENTINEL)]));
        let mut scan = RequestScan {
            guard: Some(OutboundScan::new(matcher, guard_hit.clone())),
            ..RequestScan::default()
        };
        let body = format!("{{\"a\":\"{SENTINEL}\"}}");
        let (first, second) = body.split_at(20);
        let sent = scan.push(first.as_bytes()).unwrap();
        assert!(!String::from_utf8_lossy(&sent).contains("egress-placeholder"));
        // Seen once the bytes after it are (here, at the body's end); nothing of it sent.
        let refused = match scan.push(second.as_bytes()) {
            Err(_) => true,
            Ok(sent) => {
                assert!(!String::from_utf8_lossy(&sent).contains("egress-placeholder"));
                scan.finish().is_err()
            }
        };
        assert!(refused);
        assert_eq!(guard_hit.credential(), Some("api"));

        // Replacement with a secret scan before it: the sentinel is replaced, the stream
        // otherwise unchanged, whatever the cut.
        for cut in 0..body.len() {
            let mut scan = RequestScan {
                replace: StreamReplacer::new(SENTINEL, Zeroizing::new(b"VALUE".to_vec())),
                ..RequestScan::default()
            };
            let mut out = scan.push(&body.as_bytes()[..cut]).unwrap().to_vec();
            out.extend_from_slice(&scan.push(&body.as_bytes()[cut..]).unwrap());
            out.extend_from_slice(&scan.finish().unwrap());
            assert_eq!(String::from_utf8(out).unwrap(), "{\"a\":\"VALUE\"}");
        }
    }

    #[test]
    fn the_rules_own_sentinel_in_a_trailer_stops_the_body() {
        let scan = || RequestScan {
            replace: StreamReplacer::new(SENTINEL, Zeroizing::new(b"VALUE".to_vec())),
            ..RequestScan::default()
        };
        let mut clean = HeaderMap::new();
        clean.insert("x-checksum", HeaderValue::from_static("abc"));
        assert!(scan().trailers(&clean).is_ok());
        let mut valued = clean.clone();
        valued.insert("x-note", HeaderValue::from_str(SENTINEL).unwrap());
        assert!(scan().trailers(&valued).is_err());
        let mut named = clean;
        named.insert(
            http::HeaderName::from_bytes(SENTINEL.to_ascii_lowercase().as_bytes()).unwrap(),
            HeaderValue::from_static("1"),
        );
        assert!(scan().trailers(&named).is_err());
    }
}
