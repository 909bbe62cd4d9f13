//! [`ProxyRecord`]: what the proxy reports about each request and refused connection.
//!
//! Records are plain data handed to the daemon's audit sink; they hold no secret: the
//! query string keeps its keys only, and a credential appears by name.

use std::net::SocketAddr;

/// How the connection was handled.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TlsMode {
    /// TLS terminated by the proxy, requests checked, credentials injected.
    Intercept,
    /// Bytes relayed unchanged after the server-name check.
    Passthrough,
}

impl TlsMode {
    /// `intercept` or `passthrough`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Intercept => "intercept",
            Self::Passthrough => "passthrough",
        }
    }
}

/// The proxy's decision.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Verdict {
    /// Forwarded (or meant to be: see `status` and `reason` for upstream failures).
    Allow,
    /// Refused by the proxy's checks.
    Deny,
}

impl Verdict {
    /// `allow` or `deny`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Allow => "allow",
            Self::Deny => "deny",
        }
    }
}

/// What a record describes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RecordKind {
    /// One HTTP request on an intercepted connection.
    Request,
    /// A whole connection: a passthrough relay, or one that ended before any request
    /// (refused at the TLS stage, failed handshake).
    Connection,
}

/// One audit record from the proxy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProxyRecord {
    /// Request or connection.
    pub kind: RecordKind,
    /// Sandbox name.
    pub sandbox: String,
    /// Shared with the kernel's connect record for the same connection.
    pub connection_id: String,
    /// The policy rule that redirected the connection.
    pub rule_name: String,
    /// Intercept or passthrough.
    pub tls_mode: TlsMode,
    /// Where the sandbox was connecting to.
    pub original_dst: SocketAddr,
    /// The TLS server name, normalised; `None` when the client sent none.
    pub sni: Option<String>,
    /// HTTP method (requests only).
    pub method: Option<String>,
    /// Host / `:authority` without port, normalised (requests only).
    pub host: Option<String>,
    /// Request path without query (requests only).
    pub path: Option<String>,
    /// Query keys with values dropped, e.g. `a=&b=` (requests with a query only).
    pub query_keys: Option<String>,
    /// HTTP status returned to the sandbox (requests only).
    pub status: Option<u16>,
    /// Bytes from the sandbox: request body bytes for a request, all bytes for a
    /// connection.
    pub bytes_in: u64,
    /// Bytes to the sandbox: response body bytes for a request, all bytes for a
    /// connection.
    pub bytes_out: u64,
    /// From the request (or connection) start to the end of the response (or
    /// connection).
    pub duration_ms: u64,
    /// Name of the credential injected into the request, if one was.
    pub credential: Option<String>,
    /// The injected credential's kind when it is not a plain value (`sts_assume_role`).
    pub credential_kind: Option<&'static str>,
    /// When the injected credential ends (RFC 3339), when it is a session with an end.
    pub credential_expires: Option<String>,
    /// Allow or deny.
    pub verdict: Verdict,
    /// Why it was denied, or what failed; `None` for a clean allow.
    pub reason: Option<String>,
    /// For a request on a rule with `git:`, once recognised as a git request: the
    /// repository, service and (for a push) the ref updates asked for.
    pub git: Option<GitAudit>,
    /// Secret values the proxy replaced in the response (headers, body, trailers).
    pub scrubbed: u64,
    /// A secret seen: reflected by the origin (and scrubbed), or carried by the
    /// sandbox's request (which was refused). Raises an alert beside the record.
    pub secret: Option<Box<SecretFinding>>,
}

/// Which way a secret was seen.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SecretDirection {
    /// In a response: the origin sent back what the proxy injected.
    Reflected,
    /// In a request from the sandbox, which should never hold a secret.
    Outbound,
}

/// A secret seen in a request or its response, by credential name only.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SecretFinding {
    pub direction: SecretDirection,
    /// The credentials whose values were seen, sorted.
    pub credentials: Vec<String>,
    /// How many times.
    pub count: u64,
    /// Where in the request (outbound only): `the URL`, `a header`, `the body`.
    pub place: &'static str,
}

impl SecretFinding {
    pub fn reflected(credentials: Vec<String>, count: u64) -> Box<Self> {
        Box::new(Self {
            direction: SecretDirection::Reflected,
            credentials,
            count,
            place: "the response",
        })
    }

    pub fn outbound(credential: &str, place: &'static str) -> Box<Self> {
        Box::new(Self {
            direction: SecretDirection::Outbound,
            credentials: vec![credential.to_owned()],
            count: 1,
            place,
        })
    }
}

impl ProxyRecord {
    /// The alert this record raises, if it carries a secret finding: one per request,
    /// naming the rule, origin, path and credential(s), never a value.
    pub fn alert(&self, time: time::OffsetDateTime) -> Option<crate::audit::Alert> {
        use crate::audit::{Alert, AlertKind};
        let finding = self.secret.as_ref()?;
        let names = finding.credentials.join(",");
        let origin = self.host.as_deref().or(self.sni.as_deref()).unwrap_or("?");
        let (kind, reason) = match finding.direction {
            SecretDirection::Reflected => (
                AlertKind::SecretReflected,
                format!(
                    "{origin} sent back the value of credential {names} ({} time(s)); the \
                     proxy replaced it before the sandbox saw it",
                    finding.count
                ),
            ),
            SecretDirection::Outbound => (
                AlertKind::SecretOutbound,
                format!(
                    "a request from the sandbox to {origin} carried the value of credential \
                     {names} in {}; it was refused before reaching the origin",
                    finding.place
                ),
            ),
        };
        let mut alert = Alert::new(time, kind, self.sandbox.clone(), reason);
        alert.count = finding.count.max(1);
        alert.rule = Some(self.rule_name.clone());
        alert.domain = Some(origin.to_owned());
        alert.path = self.path.clone();
        alert.credential = (!names.is_empty()).then_some(names);
        Some(alert)
    }
}

/// What a git smart-HTTP request was about.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GitAudit {
    /// `owner/name` as the URL spells it, without `.git`.
    pub repo: String,
    /// `git-upload-pack` or `git-receive-pack`.
    pub service: String,
    /// A push's commands, in order; empty for anything else.
    pub ref_updates: Vec<RefUpdate>,
}

/// One ref update of a push.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RefUpdate {
    /// Full ref name, e.g. `refs/heads/agent/x`.
    pub ref_name: String,
    /// Object id before, lower-case hex; all zeros for a creation.
    pub old: String,
    /// Object id after, lower-case hex; all zeros for a deletion.
    pub new: String,
    /// Whether the rule allows this update by itself (a push is refused whole when any
    /// of its updates is not).
    pub allowed: bool,
}

/// `a=1&b&c=x=y` -> `a=&b=&c=`: the keys of a query string, values dropped because they
/// may carry secrets. `None` for no or an empty query.
pub fn query_keys(query: Option<&str>) -> Option<String> {
    let query = query?;
    let keys: Vec<String> = query
        .split('&')
        .filter(|pair| !pair.is_empty())
        .map(|pair| {
            let key = pair.split_once('=').map_or(pair, |(k, _)| k);
            format!("{key}=")
        })
        .collect();
    if keys.is_empty() {
        None
    } else {
        Some(keys.join("&"))
    }
}

#[cfg(test)]
mod tests {
    use super::query_keys;

    #[test]
    fn query_values_are_dropped() {
        assert_eq!(query_keys(None), None);
        assert_eq!(query_keys(Some("")), None);
        assert_eq!(query_keys(Some("a=1&b=&c")).as_deref(), Some("a=&b=&c="));
        assert_eq!(
            query_keys(Some("token=s3cret&x=a=b&&")).as_deref(),
            Some("token=&x=")
        );
    }
}
