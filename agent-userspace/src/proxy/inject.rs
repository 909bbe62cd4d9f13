//! The injection forms the proxy applies to the request itself, beside headers:
//!
//! - **query**: the judged target (normalised once) gets the credential as one query
//!   parameter; any parameter the sandbox sent under that name (also percent-encoded)
//!   is removed first. That target is what is forwarded. The audit record keeps query
//!   keys only, so the value never reaches it.
//! - **placeholder**: the sandbox's sentinel for the rule's credential is replaced by the
//!   value in headers (also inside an HTTP Basic value), the query and the body (as it
//!   streams; the framing becomes chunked or HTTP/2 DATA without a length). A compressed
//!   request body is refused, as the sentinel in it could not be replaced. A sentinel of
//!   any placeholder credential in a request to a host that credential does not list
//!   refuses the request (403), before anything is sent or, in a body, before the piece
//!   holding it is sent; elsewhere (a listed host on a rule with another credential) it
//!   goes on unchanged, inert.

use base64::Engine as _;
use bytes::Bytes;
use http::header::{CONTENT_ENCODING, CONTENT_TYPE};
use http::{HeaderMap, HeaderName, HeaderValue};
use zeroize::Zeroizing;

use super::scrub::OutboundScan;
use crate::credentials::{Secret, StreamReplacer};

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
fn percent_decode(s: &str) -> Vec<u8> {
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

/// `target` (a normalised path and query) with every `param` parameter removed (by its
/// decoded name) and `param=<value, percent-encoded>` appended.
pub(super) fn set_query_param(target: &str, param: &str, value: &Secret) -> Zeroizing<String> {
    let (path, query) = match target.split_once('?') {
        Some((p, q)) => (p, q),
        None => (target, ""),
    };
    let mut out = Zeroizing::new(String::with_capacity(target.len() + param.len() + 64));
    out.push_str(path);
    out.push('?');
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let key = pair.split_once('=').map_or(pair, |(k, _)| k);
        if percent_decode(key) == param.as_bytes() {
            continue;
        }
        out.push_str(pair);
        out.push('&');
    }
    out.push_str(param);
    out.push('=');
    out.push_str(&percent_encode(value.expose()));
    out
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

/// `value` with `sentinel` replaced by `secret`: as is, or inside an HTTP Basic value
/// (decoded, replaced, encoded again). `None` when it holds no sentinel.
fn replace_in_value(
    value: &HeaderValue,
    sentinel: &str,
    secret: &Secret,
) -> Option<Result<HeaderValue, ()>> {
    let bytes = value.as_bytes();
    let text = std::str::from_utf8(bytes).ok()?;
    let replaced: Zeroizing<String> = if text.contains(sentinel) {
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
            .map_err(|_| ()),
    )
}

/// Takes out of `headers` every header (all values of its name) holding `sentinel`, with
/// the sentinel replaced by `secret`, so that stripping the sandbox's credential headers
/// leaves them; the caller puts them back afterwards. Framing headers are left alone.
/// `Err` when the value cannot be put in a header.
pub(super) fn take_replaced_headers(
    headers: &mut HeaderMap,
    sentinel: &str,
    secret: &Secret,
) -> Result<Vec<(HeaderName, HeaderValue)>, ()> {
    let names: Vec<HeaderName> = headers
        .iter()
        .filter(|(name, value)| {
            !framing(name) && replace_in_value(value, sentinel, secret).is_some()
        })
        .map(|(name, _)| name.clone())
        .collect();
    let mut out = Vec::new();
    for name in names {
        if out.iter().any(|(n, _)| *n == name) {
            continue;
        }
        let values: Vec<HeaderValue> = headers.get_all(&name).iter().cloned().collect();
        headers.remove(&name);
        for value in values {
            let value = match replace_in_value(&value, sentinel, secret) {
                Some(replaced) => replaced?,
                None => value,
            };
            out.push((name.clone(), value));
        }
    }
    Ok(out)
}

/// The query of `target` with `sentinel` replaced by the percent-encoded `secret`
/// (the path is left as judged).
pub(super) fn replace_in_query(target: &str, sentinel: &str, secret: &Secret) -> Zeroizing<String> {
    match target.split_once('?') {
        Some((path, query)) if query.contains(sentinel) => {
            let mut out = Zeroizing::new(String::with_capacity(target.len() + 64));
            out.push_str(path);
            out.push('?');
            out.push_str(&query.replace(sentinel, &percent_encode(secret.expose())));
            out
        }
        _ => Zeroizing::new(target.to_owned()),
    }
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
        Ok(())
    }

    /// The end of the body: what every stage held back.
    pub fn finish(&mut self) -> Result<Bytes, BoxError> {
        let mut out = match &mut self.secrets {
            Some(s) => s.finish(),
            None => Bytes::new(),
        };
        if let Some(guard) = &mut self.guard {
            let mut all = guard.push(&out)?.to_vec();
            all.extend_from_slice(&guard.finish());
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
            set_query_param("/v1/x", "api_key", &s).as_str(),
            "/v1/x?api_key=k3y%2Fwith%2B%26%3D"
        );
        assert_eq!(
            set_query_param(
                "/v1/x?a=1&api_key=mine&api%5Fkey=also&b&api_keyx=2",
                "api_key",
                &s
            )
            .as_str(),
            "/v1/x?a=1&b&api_keyx=2&api_key=k3y%2Fwith%2B%26%3D"
        );
        assert_eq!(
            set_query_param("/?api_key", "api_key", &s).as_str(),
            "/?api_key=k3y%2Fwith%2B%26%3D"
        );
        // Keys only reach the record: the value never does.
        let forwarded = set_query_param("/p?q=1", "api_key", &s);
        let keys = crate::audit::query_keys(forwarded.split_once('?').map(|x| x.1));
        assert_eq!(keys.as_deref(), Some("q=&api_key="));
    }

    #[test]
    fn headers_with_the_sentinel_are_replaced_basic_included() {
        let s = secret("real-token-value");
        let mut headers = HeaderMap::new();
        headers.insert(
            "authorization",
            HeaderValue::from_str(&format!("Bearer {SENTINEL}")).unwrap(),
        );
        headers.insert("x-api-key", HeaderValue::from_static(SENTINEL));
        headers.append("x-api-key", HeaderValue::from_static("other"));
        headers.insert("x-plain", HeaderValue::from_static("nothing"));
        headers.insert("connection", HeaderValue::from_static(SENTINEL));
        let basic = base64::engine::general_purpose::STANDARD.encode(format!("user:{SENTINEL}"));
        headers.insert(
            "proxy-authorization",
            HeaderValue::from_str(&format!("Basic {basic}")).unwrap(),
        );
        let mut taken = take_replaced_headers(&mut headers, SENTINEL, &s).unwrap();
        taken.sort_by(|a, b| {
            a.0.as_str()
                .cmp(b.0.as_str())
                .then(a.1.as_bytes().cmp(b.1.as_bytes()))
        });
        let shown: Vec<(String, String)> = taken
            .iter()
            .map(|(n, v)| (n.to_string(), v.to_str().unwrap().to_owned()))
            .collect();
        assert_eq!(
            shown,
            [
                (
                    "authorization".to_owned(),
                    "Bearer real-token-value".to_owned()
                ),
                ("x-api-key".to_owned(), "other".to_owned()),
                ("x-api-key".to_owned(), "real-token-value".to_owned()),
            ]
        );
        assert!(taken
            .iter()
            .all(|(n, v)| v.is_sensitive() || n == "x-api-key"));
        // Framing and proxy headers are never touched; the rest stays.
        assert!(headers.contains_key("connection") && headers.contains_key("x-plain"));
        assert!(headers.contains_key("proxy-authorization"));

        let mut h = HeaderMap::new();
        let basic = base64::engine::general_purpose::STANDARD.encode(format!("user:{SENTINEL}"));
        h.insert(
            "authorization",
            HeaderValue::from_str(&format!("Basic {basic}")).unwrap(),
        );
        let taken = take_replaced_headers(&mut h, SENTINEL, &s).unwrap();
        let want = base64::engine::general_purpose::STANDARD.encode("user:real-token-value");
        assert_eq!(taken[0].1.to_str().unwrap(), format!("Basic {want}"));
        // A value that cannot be a header value is an error, not a split header.
        let mut h = HeaderMap::new();
        h.insert("x-key", HeaderValue::from_static(SENTINEL));
        assert!(take_replaced_headers(&mut h, SENTINEL, &secret("a\r\nb")).is_err());
    }

    #[test]
    fn query_and_body_forms() {
        let s = secret("a\"b c");
        assert_eq!(
            replace_in_query(&format!("/p{SENTINEL}?k={SENTINEL}&x=1"), SENTINEL, &s).as_str(),
            format!("/p{SENTINEL}?k=a%22b%20c&x=1")
        );
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
        assert!(scan.push(second.as_bytes()).is_err());
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
}
