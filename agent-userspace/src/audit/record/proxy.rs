//! Records of the TLS proxy: one per request on an intercepted connection, one per
//! passthrough or refused connection. The proxy fills in a [`ProxyRecord`]; the daemon
//! stamps it into a [`ProxyEvent`].
//!
//! Records are plain data; they hold no secret: the query string keeps its keys only, and
//! a credential appears by name.

use std::net::SocketAddr;

use time::OffsetDateTime;

use super::*;
use crate::audit::{AlertKind, AlertResponse};

/// A request or connection reported by the TLS proxy. `record.kind` decides the action:
/// `http-request` or `tls-connection`.
///
/// Requests carry `url.*` and `http.*`, with `http.request.body.bytes` and
/// `http.response.body.bytes` because the proxy counts body bytes only (ECS
/// `http.*.bytes` would include headers). Connections carry the relayed totals as
/// `source.bytes` (from the sandbox) and `destination.bytes` (to the sandbox), and no
/// `http`. `url.domain` is the request's host, or the TLS server name when there is none.
///
/// A request on a rule with `git:` carries `egress.git`: the repository, the service
/// and, for a push, every ref update asked for with the rule's verdict on it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProxyEvent {
    /// `@timestamp`. The proxy reports a request or connection once it is over, so this is
    /// normally its end; `event.duration` says how long it took.
    pub time: OffsetDateTime,
    pub record: ProxyRecord,
}

impl ProxyEvent {
    /// `event.action`.
    pub fn action(&self) -> &'static str {
        match self.record.kind {
            RecordKind::Request => action::HTTP_REQUEST,
            RecordKind::Connection => action::TLS_CONNECTION,
        }
    }

    /// `egress.verdict`: the proxy only allows or denies, which the kernel verdicts'
    /// `allow` and `deny` already spell.
    pub(super) fn verdict(&self) -> Verdict {
        match self.record.verdict {
            ProxyVerdict::Allow => Verdict::Allow,
            ProxyVerdict::Deny => Verdict::Deny,
        }
    }

    pub(super) fn fill<'a>(&'a self, wire: &mut Wire<'a>) {
        let r = &self.record;
        let verdict = self.verdict();
        wire.event.type_ = match verdict {
            Verdict::Deny => &["connection", "denied"],
            Verdict::Allow | Verdict::Audit | Verdict::Redirect => &["connection", "allowed"],
        };
        // An allowed request whose upstream then failed is still a success here: the
        // proxy let it through, and `event.reason` says what went wrong.
        wire.event.outcome = verdict.outcome();
        wire.event.reason = non_empty(&r.reason);
        wire.event.duration = Some(r.duration_ms.saturating_mul(1_000_000));
        let domain = non_empty(&r.host).or_else(|| non_empty(&r.sni));
        let mut destination = WireDestination {
            ip: r.original_dst.ip().to_canonical(),
            port: Some(r.original_dst.port()),
            domain: None,
            bytes: None,
        };
        match r.kind {
            RecordKind::Request => {
                wire.event.category = &["network", "web"];
                // Already keys only; reducing again is a no-op then, and keeps a value
                // out of the log if one ever got this far.
                let query = r.query_keys.as_deref().and_then(|q| query_keys(Some(q)));
                wire.url = WireUrl::new(domain, non_empty(&r.path), query);
                wire.http = Some(WireHttp {
                    request: WireHttpRequest {
                        method: non_empty(&r.method),
                        body: WireBytes { bytes: r.bytes_in },
                    },
                    response: WireHttpResponse {
                        status_code: r.status,
                        body: WireBytes { bytes: r.bytes_out },
                    },
                });
            }
            RecordKind::Connection => {
                wire.event.category = &["network"];
                wire.url = WireUrl::new(domain, None, None);
                wire.source = Some(WireBytes { bytes: r.bytes_in });
                destination.bytes = Some(r.bytes_out);
            }
        }
        wire.destination = Some(destination);
        wire.tls = non_empty(&r.sni).map(|server_name| WireTls {
            client: WireTlsClient { server_name },
        });
        wire.rule = Some(WireRule { name: &r.rule_name });
        wire.egress.sandbox = Some(WireSandbox::named(&r.sandbox));
        wire.egress.connection = Some(WireConnection {
            id: WireConnectionId::Proxy(&r.connection_id),
        });
        wire.egress.verdict = Some(verdict);
        wire.egress.tls_mode = Some(r.tls_mode.as_str());
        wire.egress.credential = non_empty(&r.credential).map(|name| {
            let mut credential = WireCredential::named(name);
            if let Some(usage) = &r.credential_use {
                credential.kind = Some(usage.kind);
                credential.source = Some(usage.source);
                credential.expires = usage.expires.map(crate::credentials::rfc3339);
            }
            credential
        });
        wire.egress.scrubbed = (r.scrubbed > 0).then_some(r.scrubbed);
        wire.egress.git = r.git.as_ref().map(|git| WireGit {
            repo: &git.repo,
            service: &git.service,
            ref_updates: git
                .ref_updates
                .iter()
                .map(|u| WireRefUpdate {
                    ref_name: &u.ref_name,
                    old: &u.old,
                    new: &u.new,
                    allowed: u.allowed,
                })
                .collect(),
        });
    }
}

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
pub enum ProxyVerdict {
    /// Forwarded (or meant to be: see `status` and `reason` for upstream failures).
    Allow,
    /// Refused by the proxy's checks.
    Deny,
}

impl ProxyVerdict {
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
    /// That credential's kind, source and expiry (never its value).
    pub credential_use: Option<Box<crate::credentials::CredentialUse>>,
    /// Allow or deny.
    pub verdict: ProxyVerdict,
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
    /// The request was handed to an upstream connection, so what it asked (with the
    /// credential, if one was injected) may have been done. Not a field of its own in
    /// the log (the reason of a request abandoned after it says so); such a record is
    /// never summarised.
    pub forwarded: bool,
}

/// Which way a secret was seen.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SecretDirection {
    /// In a response: the origin sent back what the proxy injected.
    Reflected,
    /// In a request from the sandbox, which should never hold a secret.
    Outbound,
    /// A placeholder sentinel in a request to a host its credential does not list.
    Placeholder,
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

    pub fn placeholder(credential: &str, place: &'static str) -> Box<Self> {
        Box::new(Self {
            direction: SecretDirection::Placeholder,
            credentials: vec![credential.to_owned()],
            count: 1,
            place,
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

/// Prefix of the reason of every request the client gave up on.
pub const CLIENT_ABORTED: &str = "client aborted";

impl ProxyRecord {
    /// Whether this record (with `alert`, the one it raises) may be counted rather than
    /// written once its sandbox is past its refusal limit: a refusal, or a request its
    /// client gave up on before any response (an HTTP/2 client resetting stream after
    /// stream could otherwise write records without bound), but never a request sent
    /// upstream (abandoned while its response was awaited: it may have been carried out,
    /// with the credential injected), never one that found a
    /// secret, a push's with its ref updates (the evidence of what was asked), or a
    /// refused dial upstream (an address the rule may not reach). A misplaced
    /// placeholder (not a secret) is limited with its alert when the alert is only
    /// recorded (`alert.response`, set by the caller to the response configured): the
    /// sandbox could repeat it at will; one the sandbox's settings answer with a
    /// quarantine is always raised (the quarantine ends the flood), so refusals sent
    /// first cannot spare a sandbox its response. Other git requests are limited too (a
    /// refused fetch costs nothing to repeat).
    pub fn may_be_summarised(&self, alert: Option<&Alert>) -> bool {
        let placeholder_only = alert.is_none_or(|a| {
            a.kind == AlertKind::PlaceholderMisdirected && a.response == AlertResponse::Record
        });
        let push = self.git.as_ref().is_some_and(|g| !g.ref_updates.is_empty());
        let abandoned = self.status.is_none()
            && self
                .reason
                .as_deref()
                .is_some_and(|r| r.starts_with(CLIENT_ABORTED));
        placeholder_only
            && (self.verdict == ProxyVerdict::Deny || abandoned)
            && !self.forwarded
            && !push
            && !self
                .reason
                .as_deref()
                .is_some_and(|r| r.starts_with("upstream"))
    }

    /// The alert this record raises, if it carries a secret finding: one per request,
    /// naming the rule, origin, path and credential(s), never a value.
    pub fn alert(&self, time: OffsetDateTime) -> Option<Alert> {
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
            SecretDirection::Placeholder => (
                AlertKind::PlaceholderMisdirected,
                format!(
                    "a request from the sandbox to {origin} carried its placeholder for \
                     credential {names} in {}, where it is not replaced (a host the \
                     credential does not list, or a place its `inject.placeholder` does not \
                     allow); it was refused before reaching the origin",
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
    pub(super) fn query_values_are_dropped() {
        assert_eq!(query_keys(None), None);
        assert_eq!(query_keys(Some("")), None);
        assert_eq!(query_keys(Some("a=1&b=&c")).as_deref(), Some("a=&b=&c="));
        assert_eq!(
            query_keys(Some("token=s3cret&x=a=b&&")).as_deref(),
            Some("token=&x=")
        );
    }
}
