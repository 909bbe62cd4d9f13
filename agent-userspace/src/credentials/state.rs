//! What the daemon tells about its credentials without their values: the state
//! `egressctl credentials` lists ([`CredentialState`]) and what an audit record says about
//! the credential a request used ([`CredentialUse`]). Also the `query` and `placeholder`
//! injection forms' configuration checks.

use std::sync::Mutex;
use std::time::SystemTime;

use serde::{Deserialize, Serialize};

use super::raw::RawInject;

/// One credential as `egressctl credentials` shows it. Never a value.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CredentialState {
    pub name: String,
    /// How the value is sent: `header`, `basic`, `query`, `placeholder`.
    pub kind: String,
    /// Where it comes from: `file`, `env`, `command`, `github_app`, `vault`.
    pub source: String,
    /// The only hosts it is sent to.
    pub hosts: Vec<String>,
    /// When a new value was last read, fetched or minted (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_fetch: Option<String>,
    /// When the current value stops being used (RFC 3339), when known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires: Option<String>,
    /// The last failure to get the value, cleared by the next success.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
    /// Source details without secrets: a KV secret's version, whether a lease is held.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
    /// Attached sandboxes whose policy names it.
    #[serde(default)]
    pub sandboxes: Vec<String>,
}

/// `egress.credential` of a proxy record, beside its name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CredentialUse {
    /// How the value was sent: `header`, `basic`, `query`, `placeholder`.
    pub kind: &'static str,
    /// Where it came from: `file`, `env`, `command`, `github_app`, `vault`.
    pub source: &'static str,
    /// When the value used stops being used, when known.
    pub expires: Option<SystemTime>,
}

/// When a credential last got a new value, and its last error.
#[derive(Debug, Default)]
pub(super) struct LastFetch(Mutex<LastInner>);

#[derive(Debug, Default)]
struct LastInner {
    at: Option<SystemTime>,
    /// Address of the value last seen: a different one is a new value.
    value: usize,
    error: Option<String>,
}

impl LastFetch {
    /// Notes a fetch's outcome: the value (by address) or the error's text.
    pub(super) fn note(&self, outcome: Result<&std::sync::Arc<super::Secret>, String>) {
        let mut last = self.0.lock().unwrap_or_else(|p| p.into_inner());
        match outcome {
            Ok(value) => {
                let addr = std::sync::Arc::as_ptr(value) as usize;
                if addr != last.value {
                    last.value = addr;
                    last.at = Some(SystemTime::now());
                }
                last.error = None;
            }
            Err(error) => last.error = Some(error),
        }
    }

    pub(super) fn get(&self) -> (Option<SystemTime>, Option<String>) {
        let last = self.0.lock().unwrap_or_else(|p| p.into_inner());
        (last.at, last.error.clone())
    }
}

/// RFC 3339 in UTC, seconds precision.
pub fn rfc3339(t: SystemTime) -> String {
    let t = time::OffsetDateTime::from(t);
    let t = t.replace_nanosecond(0).unwrap_or(t);
    t.format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}

/// The `query` or `placeholder` form, compiled.
pub(super) enum OtherInject {
    Query(String),
    Placeholder(PlaceholderScope),
}

/// Where a placeholder credential's sentinel is replaced: always in `Authorization`
/// (also inside HTTP Basic), and in these headers, query parameters and the body.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PlaceholderScope {
    /// Further headers (never hop-by-hop, framing or method/URL override headers).
    pub headers: Vec<http::HeaderName>,
    /// Query parameters (by decoded name) whose value may carry it.
    pub query: Vec<String>,
    /// The body too (the sandbox then chooses where in it the value lands).
    pub body: bool,
}

/// Method and URL override headers: some frameworks run another method or path than the
/// request line's on them, so the proxy strips them and no credential goes in them.
pub const OVERRIDE_HEADERS: [&str; 8] = [
    "x-http-method-override",
    "x-http-method",
    "x-method-override",
    "x-original-url",
    "x-rewrite-url",
    "x-original-method",
    // Vault and OpenBao put the request's path under this namespace: the path judged
    // would not be the one served (write a namespace in the path, where it is judged).
    "x-vault-namespace",
    // Vault Enterprise: overrides soft-mandatory Sentinel policies.
    "x-vault-policy-override",
];

/// Whether `name` (lower case) is a header that proxies and frameworks read as where the
/// request was sent or came from (`Forwarded`, `X-Forwarded-Host`, `X-Original-URI`,
/// `X-Real-IP`...): an origin that trusts one would act on a host, path or client the
/// rule never judged, so the proxy strips them.
pub fn is_routing_header(name: &str) -> bool {
    const NAMES: [&str; 19] = [
        "forwarded",
        "forwarded-for",
        "x-forwarded",
        "x-host",
        "x-original-host",
        "x-original-uri",
        "x-original-path",
        // The path prefix the app is mounted at, taken off the path it routes (Flask's
        // widely copied `ReverseProxied` middleware).
        "x-script-name",
        "x-original-forwarded-for",
        "x-real-ip",
        "x-client-ip",
        "x-cluster-client-ip",
        "x-remote-ip",
        "x-remote-addr",
        "true-client-ip",
        "client-ip",
        "cf-connecting-ip",
        "fastly-client-ip",
        "via",
    ];
    NAMES.contains(&name)
        || name.starts_with("x-forwarded-")
        || name.starts_with("x-envoy-")
        // `X-Sendfile-Type` and `X-Accel-Mapping`: Rack::Sendfile (before CVE-2025-61780)
        // took them from the request, and answered with an `X-Accel-Redirect` to a
        // location the request named, which nginx in front then serves with the injected
        // credential; no request header of either family is the sandbox's to set.
        || name.starts_with("x-sendfile")
        || name.starts_with("x-accel-")
        || name.starts_with("x-lighttpd-send-file")
}

/// Headers a placeholder may never be replaced in: they frame, route or are stripped
/// (and [`OVERRIDE_HEADERS`]).
const NOT_PLACEHOLDER_HEADERS: [&str; 13] = [
    "host",
    "connection",
    "content-length",
    "transfer-encoding",
    "te",
    "trailer",
    "upgrade",
    "keep-alive",
    "proxy-connection",
    "proxy-authorization",
    "proxy-authenticate",
    "content-encoding",
    "content-type",
];

/// Whether `name` is a query parameter name the config may give.
fn valid_param(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 128
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

fn compile_placeholder(
    raw: &crate::credentials::raw::RawPlaceholder,
) -> Result<PlaceholderScope, (&'static str, String)> {
    let mut scope = PlaceholderScope {
        body: raw.body,
        ..PlaceholderScope::default()
    };
    for header in &raw.headers {
        let name = http::HeaderName::from_bytes(header.as_bytes()).map_err(|_| {
            (
                "inject.placeholder.headers",
                format!("`{header}` is not a header name"),
            )
        })?;
        if NOT_PLACEHOLDER_HEADERS.contains(&name.as_str())
            || OVERRIDE_HEADERS.contains(&name.as_str())
        {
            return Err((
                "inject.placeholder.headers",
                format!("`{header}` frames, routes or overrides the request; it cannot carry a placeholder"),
            ));
        }
        if name != http::header::AUTHORIZATION && !scope.headers.contains(&name) {
            scope.headers.push(name);
        }
    }
    for param in &raw.query {
        if !valid_param(param) {
            return Err((
                "inject.placeholder.query",
                format!("`{param}` is not a query parameter name (letters, digits, `-`, `_`, `.`)"),
            ));
        }
        if !scope.query.contains(param) {
            scope.query.push(param.clone());
        }
    }
    Ok(scope)
}

/// `Some` when `raw` asks for `query` or `placeholder` (and nothing else), `None` when it
/// asks for neither; an error when it mixes forms or names a bad parameter.
pub(super) fn compile_query_or_placeholder(
    raw: &RawInject,
) -> Result<Option<OtherInject>, (&'static str, String)> {
    let others = usize::from(raw.header.is_some())
        + usize::from(raw.format.is_some())
        + usize::from(raw.basic.is_some());
    let result = match (&raw.query, &raw.placeholder) {
        (None, None) => return Ok(None),
        (Some(_), Some(_)) => None,
        (Some(q), None) => {
            if !valid_param(&q.param) {
                return Err((
                    "inject.query.param",
                    format!(
                        "`{}` is not a query parameter name (letters, digits, `-`, `_`, `.`)",
                        q.param
                    ),
                ));
            }
            Some(OtherInject::Query(q.param.clone()))
        }
        (None, Some(p)) => Some(OtherInject::Placeholder(compile_placeholder(p)?)),
    };
    match result {
        Some(inject) if others == 0 => Ok(Some(inject)),
        _ => Err((
            "inject",
            "give exactly one of `header` (with `format`), `basic`, `query` and `placeholder`"
                .to_owned(),
        )),
    }
}

#[cfg(test)]
#[expect(clippy::unwrap_used, reason = "tests fail loudly")]
mod tests {
    use super::*;
    use crate::credentials::raw::{RawPlaceholder, RawQuery};

    fn raw(yaml: &str) -> RawInject {
        serde_yaml_ng::from_str(yaml).unwrap()
    }

    #[test]
    fn query_and_placeholder_forms() {
        assert!(matches!(
            compile_query_or_placeholder(&raw("{ query: { param: api_key } }")),
            Ok(Some(OtherInject::Query(p))) if p == "api_key"
        ));
        assert!(matches!(
            compile_query_or_placeholder(&raw("{ placeholder: {} }")),
            Ok(Some(OtherInject::Placeholder(s))) if s == PlaceholderScope::default()
        ));
        assert!(matches!(
            compile_query_or_placeholder(&raw(
                "{ placeholder: { headers: [X-Api-Key, authorization, x-api-key], query: [key], body: true } }"
            )),
            Ok(Some(OtherInject::Placeholder(s)))
                if s.headers == [http::HeaderName::from_static("x-api-key")]
                    && s.query == ["key"]
                    && s.body
        ));
        assert!(matches!(
            compile_query_or_placeholder(&raw("{ header: X-Key }")),
            Ok(None)
        ));
        for bad in [
            "{ query: { param: \"a&b\" } }",
            "{ query: { param: \"\" } }",
            "{ query: { param: k }, placeholder: {} }",
            "{ query: { param: k }, header: X-Key }",
            "{ placeholder: {}, basic: { user: u } }",
            "{ placeholder: { headers: [Connection] } }",
            "{ placeholder: { headers: [X-HTTP-Method-Override] } }",
            "{ placeholder: { headers: [Host] } }",
            "{ placeholder: { headers: [\"a b\"] } }",
            "{ placeholder: { query: [\"a&b\"] } }",
        ] {
            assert!(compile_query_or_placeholder(&raw(bad)).is_err(), "{bad}");
        }
        assert!(serde_yaml_ng::from_str::<RawInject>("{ placeholder: { x: 1 } }").is_err());
        let _ = (RawQuery { param: "k".into() }, RawPlaceholder::default());
    }
}
