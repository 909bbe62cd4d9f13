//! Typed audit records and their encoding as one Elastic Common Schema (ECS) JSON object.
//!
//! The daemon builds a [`Record`] from typed values; the writer assigns the sequence
//! number and calls [`Record::encode`]. Fields ECS defines keep their ECS names and
//! nesting (`event.outcome`, `destination.ip`, `process.pid`, ...); everything else lives
//! under `egress`. `schema/audit-record.schema.json` describes every kind and is checked
//! against the encoder by the tests.
//!
//! Records must be built only from typed, non-secret data: names, ids, addresses, digests
//! and error messages that themselves never carry a secret value. There is deliberately no
//! field for free-form payloads, headers or credential material: a proxy record names the
//! credential it injected, and its query string is reduced to keys again here, so a value
//! that slipped through upstream still never reaches the log.

use time::OffsetDateTime;

mod dns;
mod fit;
mod json;
mod kernel;
mod lifecycle;
mod proxy;
mod values;
mod wire;

pub use dns::{DnsEvent, DnsVerdict, RefusedAnswer};
pub use fit::MAX_LINE;
pub use kernel::*;
pub use lifecycle::*;
pub use proxy::*;
pub use values::*;
use wire::*;

use super::alert::Alert;
use super::clock::ClockOffset;

/// `observer.product` of every record.
pub const PRODUCT: &str = "egressd";
/// `observer.version` of every record: the version of this build.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
/// `ecs.version`: the ECS release whose field definitions and allowed values we follow.
pub const ECS_VERSION: &str = "8.11.0";

/// `event.action` values, one per record kind.
pub mod action {
    pub const CONNECT: &str = "connect";
    pub const SENDMSG: &str = "sendmsg";
    /// A socket refused at creation.
    pub const SOCKET: &str = "socket";
    /// A socket option refused (source routes, routing headers).
    pub const SETSOCKOPT: &str = "setsockopt";
    /// A packet dropped on its way out (IPv4 options, IPv6 routing header).
    pub const PACKET: &str = "packet";
    /// A bind to a port of the daemon's listeners refused.
    pub const BIND: &str = "bind";
    /// A write to a network sysctl refused.
    pub const SYSCTL: &str = "sysctl";
    /// A connection the sandbox's new policy refuses, closed by the daemon.
    pub const CONNECTION_CUT: &str = "connection-cut";
    pub const EVENTS_LOST: &str = "events-lost";
    /// Audit records numbered but never written (the log could not be written).
    pub const AUDIT_LOST: &str = "audit-lost";
    /// Records written again after the log was truncated in place.
    pub const AUDIT_REWRITTEN: &str = "audit-rewritten";
    pub const DAEMON_START: &str = "daemon-start";
    pub const DAEMON_STOP: &str = "daemon-stop";
    pub const SANDBOX_ATTACH: &str = "sandbox-attach";
    pub const SANDBOX_DETACH: &str = "sandbox-detach";
    pub const SANDBOX_ADOPT: &str = "sandbox-adopt";
    pub const POLICY_CHANGE: &str = "policy-change";
    pub const POLICY_REJECTED: &str = "policy-rejected";
    pub const HTTP_REQUEST: &str = "http-request";
    pub const TLS_CONNECTION: &str = "tls-connection";
    pub const DNS_QUERY: &str = "dns-query";
    pub const SANDBOX_QUARANTINE: &str = "sandbox-quarantine";
    pub const SANDBOX_RELEASE: &str = "sandbox-release";
    pub const CREDENTIAL_REVOKE: &str = "credential-revoke";

    /// Every action above: with the alerts' (`AlertKind::ALL`), every `event.action` a
    /// record can carry (the schema's list, which a test holds them to).
    pub const ALL: [&str; 24] = [
        CONNECT,
        SENDMSG,
        SOCKET,
        SETSOCKOPT,
        PACKET,
        BIND,
        SYSCTL,
        CONNECTION_CUT,
        EVENTS_LOST,
        AUDIT_LOST,
        AUDIT_REWRITTEN,
        DAEMON_START,
        DAEMON_STOP,
        SANDBOX_ATTACH,
        SANDBOX_DETACH,
        SANDBOX_ADOPT,
        POLICY_CHANGE,
        POLICY_REJECTED,
        HTTP_REQUEST,
        TLS_CONNECTION,
        DNS_QUERY,
        SANDBOX_QUARANTINE,
        SANDBOX_RELEASE,
        CREDENTIAL_REVOKE,
    ];
}

/// One audit record. The writer adds `@timestamp` formatting, `event.sequence`, `ecs` and
/// `observer`; everything else comes from the variant.
#[derive(Clone, Debug, PartialEq)]
pub enum Record {
    /// A connect or sendmsg decision reported by a kernel program.
    Network(NetworkDecision),
    /// Kernel events that could not be delivered to the daemon.
    EventsLost(EventsLost),
    /// Audit records that were numbered but could not be written.
    AuditLost(AuditLost),
    /// Records written again after the log was truncated in place.
    AuditRewritten(AuditRewritten),
    DaemonStart(DaemonStart),
    DaemonStop(DaemonStop),
    /// A cgroup was put under a policy.
    SandboxAttach(SandboxLifecycle),
    /// A cgroup was released (its programs and map entries removed).
    SandboxDetach(SandboxLifecycle),
    /// A restarted daemon took over a sandbox its predecessor attached.
    SandboxAdopt(SandboxLifecycle),
    PolicyChange(PolicyChange),
    /// A new policy was refused; the sandbox keeps its previous one.
    PolicyRejected(PolicyRejected),
    /// An HTTP request on an intercepted connection (`http-request`), or a whole proxied
    /// connection: a passthrough relay or one refused before any request
    /// (`tls-connection`).
    Proxy(ProxyEvent),
    /// A DNS query a sandbox's resolver answered, refused or dropped.
    Dns(DnsEvent),
    /// Something an operator should look at now (`event.kind: alert`).
    Alert(Alert),
    /// A sandbox was switched to deny-all (by an operator or an alert's response).
    SandboxQuarantine(Quarantine),
    /// A quarantined sandbox got its policy back.
    SandboxRelease(Quarantine),
    /// A credential's live value was revoked (or the attempt failed) because its sandbox
    /// was quarantined.
    CredentialRevoke(CredentialRevoke),
}

impl Record {
    /// The sandbox the record is about, if one.
    pub fn sandbox(&self) -> Option<&str> {
        match self {
            Self::Network(r) => Some(&r.sandbox),
            Self::Dns(r) => Some(&r.sandbox),
            Self::Proxy(r) => Some(&r.record.sandbox),
            Self::Alert(r) => Some(&r.sandbox),
            Self::SandboxAttach(r) | Self::SandboxDetach(r) | Self::SandboxAdopt(r) => {
                Some(&r.sandbox)
            }
            Self::SandboxQuarantine(r) | Self::SandboxRelease(r) => Some(&r.sandbox),
            Self::CredentialRevoke(r) => Some(&r.sandbox),
            Self::PolicyChange(r) => Some(&r.sandbox),
            Self::PolicyRejected(r) => Some(&r.sandbox),
            Self::EventsLost(_)
            | Self::AuditLost(_)
            | Self::AuditRewritten(_)
            | Self::DaemonStart(_)
            | Self::DaemonStop(_) => None,
        }
    }

    /// The event time the record carries (not the time it is written).
    pub fn time(&self) -> OffsetDateTime {
        match self {
            Self::Network(r) => r.time,
            Self::EventsLost(r) => r.time,
            Self::AuditLost(r) => r.time,
            Self::AuditRewritten(r) => r.time,
            Self::DaemonStart(r) => r.time,
            Self::DaemonStop(r) => r.time,
            Self::SandboxAttach(r) | Self::SandboxDetach(r) | Self::SandboxAdopt(r) => r.time,
            Self::PolicyChange(r) => r.time,
            Self::PolicyRejected(r) => r.time,
            Self::Proxy(r) => r.time,
            Self::Dns(r) => r.time,
            Self::Alert(r) => r.time,
            Self::SandboxQuarantine(r) | Self::SandboxRelease(r) => r.time,
            Self::CredentialRevoke(r) => r.time,
        }
    }

    /// `event.action`.
    pub fn action(&self) -> &'static str {
        match self {
            Self::Network(r) => r.hook.action(),
            Self::EventsLost(_) => action::EVENTS_LOST,
            Self::AuditLost(_) => action::AUDIT_LOST,
            Self::AuditRewritten(_) => action::AUDIT_REWRITTEN,
            Self::DaemonStart(_) => action::DAEMON_START,
            Self::DaemonStop(_) => action::DAEMON_STOP,
            Self::SandboxAttach(_) => action::SANDBOX_ATTACH,
            Self::SandboxDetach(_) => action::SANDBOX_DETACH,
            Self::SandboxAdopt(_) => action::SANDBOX_ADOPT,
            Self::PolicyChange(_) => action::POLICY_CHANGE,
            Self::PolicyRejected(_) => action::POLICY_REJECTED,
            Self::Proxy(r) => r.action(),
            Self::Dns(_) => action::DNS_QUERY,
            Self::Alert(r) => r.kind.as_str(),
            Self::SandboxQuarantine(_) => action::SANDBOX_QUARANTINE,
            Self::SandboxRelease(_) => action::SANDBOX_RELEASE,
            Self::CredentialRevoke(_) => action::CREDENTIAL_REVOKE,
        }
    }

    /// Serialises the record as one JSON object followed by `\n`, at most [`MAX_LINE`]
    /// bytes. Every control character inside strings is escaped, so the only newline is
    /// the terminator.
    pub fn encode(&self, sequence: u64) -> Result<Vec<u8>, EncodeError> {
        let mut buf = Vec::with_capacity(768);
        self.encode_into(sequence, &mut buf)?;
        Ok(buf)
    }

    /// [`Record::encode`], appended to `out`; on an error `out` may hold part of a line.
    /// A line longer than [`MAX_LINE`] is encoded again, shortened (see [`fit`]).
    pub fn encode_into(&self, sequence: u64, out: &mut Vec<u8>) -> Result<(), EncodeError> {
        self.encode_into_masked(sequence, out, &|_| {})
    }

    /// [`Record::encode_into`], with `mask` applied to every string a shortening may cut,
    /// before it cuts them.
    pub fn encode_into_masked(
        &self,
        sequence: u64,
        out: &mut Vec<u8>,
        mask: &dyn Fn(&mut String),
    ) -> Result<(), EncodeError> {
        let wire = self.to_wire(sequence)?;
        let start = out.len();
        json::Json::json(&wire, out);
        if out.len() - start >= MAX_LINE {
            out.truncate(start);
            let shortened = fit::shortened(&wire, mask).map_err(|source| EncodeError::Json {
                action: self.action(),
                source,
            })?;
            out.extend_from_slice(&shortened);
        }
        out.push(b'\n');
        Ok(())
    }

    /// The record's line as serde_json writes the same layout (what [`Record::encode`]
    /// must equal, for lines that need no shortening).
    #[cfg(test)]
    pub(crate) fn encode_with_serde(&self, sequence: u64) -> Result<Vec<u8>, EncodeError> {
        let mut line =
            serde_json::to_vec(&self.to_wire(sequence)?).map_err(|source| EncodeError::Json {
                action: self.action(),
                source,
            })?;
        line.push(b'\n');
        Ok(line)
    }

    fn to_wire(&self, sequence: u64) -> Result<Wire<'_>, EncodeError> {
        let action = self.action();
        let mut wire = Wire {
            timestamp: stamp(self.time(), action, "@timestamp")?,
            ecs: Ecs {
                version: ECS_VERSION,
            },
            event: WireEvent {
                kind: "event",
                category: &["configuration"],
                type_: &["info"],
                action,
                outcome: Outcome::Success,
                reason: None,
                duration: None,
                sequence,
            },
            observer: Observer {
                product: PRODUCT,
                version: VERSION,
            },
            process: None,
            user: None,
            group: None,
            network: None,
            source: None,
            destination: None,
            url: None,
            http: None,
            tls: None,
            dns: None,
            server: None,
            rule: None,
            error: None,
            egress: WireEgress::default(),
        };
        match self {
            Self::Network(r) => r.fill(&mut wire),
            Self::EventsLost(r) => {
                wire.event.category = &["network"];
                wire.event.type_ = &["error"];
                wire.event.outcome = Outcome::Failure;
                wire.egress.lost = Some(WireLost {
                    count: r.count,
                    total: r.total,
                    sandboxes: &r.sandboxes,
                });
            }
            Self::AuditLost(r) => {
                wire.event.category = &["file"];
                wire.event.type_ = &["error"];
                wire.event.outcome = Outcome::Failure;
                wire.error = Some(WireError { message: &r.error });
                wire.egress.audit_lost = Some(WireAuditLost {
                    count: r.count,
                    first_sequence: r.first_sequence,
                    last_sequence: r.last_sequence,
                    sandboxes: &r.sandboxes,
                    since: r
                        .since
                        .map(|t| stamp(t, action, "egress.audit_lost.since"))
                        .transpose()?,
                });
            }
            Self::AuditRewritten(r) => {
                wire.event.category = &["file"];
                wire.event.type_ = &["change"];
                wire.event.reason = Some(&r.reason);
                wire.egress.audit_rewritten = Some(WireAuditRewritten {
                    count: r.count,
                    first_sequence: r.first_sequence,
                    last_sequence: r.last_sequence,
                    complete: r.complete,
                });
            }
            Self::DaemonStart(r) => {
                wire.event.category = &["process"];
                wire.event.type_ = &["start"];
                wire.process = Some(WireProcess {
                    pid: r.pid,
                    name: Some(PRODUCT),
                });
                wire.egress.daemon = Some(WireDaemon {
                    adopted_sandboxes: r.adopted_sandboxes,
                });
                if let Some(previous_seen) = r.previous_seen {
                    wire.egress.gap = Some(WireGap {
                        previous_seen: stamp(previous_seen, action, "egress.gap.previous_seen")?,
                        // Microseconds, like the timestamps it is computed from.
                        seconds: (r.time - previous_seen).whole_microseconds() as f64 / 1e6,
                    });
                }
            }
            Self::DaemonStop(r) => {
                wire.event.category = &["process"];
                wire.event.type_ = &["end"];
                wire.event.outcome = r.reason.outcome();
                wire.event.reason = Some(r.reason.as_str());
                wire.process = Some(WireProcess {
                    pid: r.pid,
                    name: Some(PRODUCT),
                });
            }
            Self::SandboxAttach(r) => r.fill(&mut wire, &["creation"]),
            Self::SandboxDetach(r) => r.fill(&mut wire, &["deletion"]),
            // The sandbox already existed; what changed is who confines it.
            Self::SandboxAdopt(r) => r.fill(&mut wire, &["change"]),
            Self::PolicyChange(r) => {
                wire.event.type_ = &["change"];
                wire.egress.sandbox = Some(WireSandbox::named(&r.sandbox));
                wire.egress.policy = Some(WirePolicy {
                    path: r.policy_path.to_string_lossy(),
                    digest: Some(&r.digest),
                    previous_digest: Some(&r.previous_digest),
                });
            }
            Self::PolicyRejected(r) => {
                wire.event.type_ = &["change"];
                wire.event.outcome = Outcome::Failure;
                wire.egress.sandbox = Some(WireSandbox::named(&r.sandbox));
                wire.egress.policy = Some(WirePolicy {
                    path: r.policy_path.to_string_lossy(),
                    digest: r.policy_digest.as_ref(),
                    previous_digest: None,
                });
                wire.error = Some(WireError { message: &r.error });
            }
            Self::Proxy(r) => r.fill(&mut wire),
            Self::Dns(r) => r.fill(&mut wire),
            Self::Alert(r) => fill_alert(r, &mut wire),
            Self::SandboxQuarantine(r) | Self::SandboxRelease(r) => r.fill(&mut wire),
            Self::CredentialRevoke(r) => r.fill(&mut wire),
        }
        Ok(wire)
    }
}

macro_rules! impl_from {
    ($($ty:ident => $variant:ident),* $(,)?) => {
        $(impl From<$ty> for Record {
            fn from(r: $ty) -> Self {
                Self::$variant(r)
            }
        })*
    };
}
impl_from!(
    NetworkDecision => Network,
    EventsLost => EventsLost,
    AuditLost => AuditLost,
    AuditRewritten => AuditRewritten,
    DaemonStart => DaemonStart,
    DaemonStop => DaemonStop,
    PolicyChange => PolicyChange,
    PolicyRejected => PolicyRejected,
    ProxyEvent => Proxy,
    DnsEvent => Dns,
    Alert => Alert,
    CredentialRevoke => CredentialRevoke,
);

/// Why a record could not be encoded. Carries the action so the message says which
/// record was dropped.
#[derive(Debug, thiserror::Error)]
pub enum EncodeError {
    #[error("{action} record: {field} {value} is outside the years 0000-9999 RFC 3339 allows")]
    TimestampRange {
        action: &'static str,
        field: &'static str,
        value: OffsetDateTime,
    },
    #[error("{action} record: formatting {field}: {source}")]
    Timestamp {
        action: &'static str,
        field: &'static str,
        #[source]
        source: time::error::Format,
    },
    #[error("{action} record: serialising JSON: {source}")]
    Json {
        action: &'static str,
        #[source]
        source: serde_json::Error,
    },
}

/// RFC 3339 in UTC with exactly six sub-second digits, e.g. `2026-11-21T22:03:04.123456Z`.
pub fn format_timestamp(
    t: OffsetDateTime,
    action: &'static str,
    field: &'static str,
) -> Result<String, EncodeError> {
    stamp(t, action, field).map(|s| s.as_str().to_owned())
}

/// [`format_timestamp`]'s text, kept on the stack.
fn stamp(
    t: OffsetDateTime,
    action: &'static str,
    field: &'static str,
) -> Result<Stamp, EncodeError> {
    super::timestamp::rfc3339_micros_text(t)
        .map(Stamp)
        .ok_or(EncodeError::TimestampRange {
            action,
            field,
            value: t,
        })
}
