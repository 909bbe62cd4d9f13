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

use std::{
    borrow::Cow,
    fmt,
    net::{IpAddr, SocketAddr},
    path::PathBuf,
};

use agent_common::{hook, sockopt, verdict, ConnectEvent};
use serde::{Serialize, Serializer};
use sha2::{Digest, Sha256};
use time::OffsetDateTime;

use super::alert::Alert;
use super::clock::ClockOffset;
// `proxy::record` is private; its types are re-exported from `proxy`.
use crate::proxy::{self, ProxyRecord, RecordKind};

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
    pub const EVENTS_LOST: &str = "events-lost";
    /// Audit records numbered but never written (the log could not be written).
    pub const AUDIT_LOST: &str = "audit-lost";
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
    /// The event time the record carries (not the time it is written).
    pub fn time(&self) -> OffsetDateTime {
        match self {
            Self::Network(r) => r.time,
            Self::EventsLost(r) => r.time,
            Self::AuditLost(r) => r.time,
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

    /// Serialises the record as one JSON object followed by `\n`. serde_json escapes every
    /// control character inside strings, so the only newline is the terminator.
    pub fn encode(&self, sequence: u64) -> Result<Vec<u8>, EncodeError> {
        let mut buf = Vec::with_capacity(768);
        self.encode_into(sequence, &mut buf)?;
        Ok(buf)
    }

    /// [`Record::encode`], appended to `out`; on an error `out` may hold part of a line.
    pub fn encode_into(&self, sequence: u64, out: &mut Vec<u8>) -> Result<(), EncodeError> {
        let wire = self.to_wire(sequence)?;
        serde_json::to_writer(&mut *out, &wire).map_err(|source| EncodeError::Json {
            action: self.action(),
            source,
        })?;
        out.push(b'\n');
        Ok(())
    }

    fn to_wire(&self, sequence: u64) -> Result<Wire<'_>, EncodeError> {
        let action = self.action();
        let mut wire = Wire {
            timestamp: format_timestamp(self.time(), action, "@timestamp")?,
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
                    since: r
                        .since
                        .map(|t| format_timestamp(t, action, "egress.audit_lost.since"))
                        .transpose()?,
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
                        previous_seen: format_timestamp(
                            previous_seen,
                            action,
                            "egress.gap.previous_seen",
                        )?,
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
    super::timestamp::rfc3339_micros(t).ok_or(EncodeError::TimestampRange {
        action,
        field,
        value: t,
    })
}

// ---------------------------------------------------------------------------------------
// Record kinds
// ---------------------------------------------------------------------------------------

/// A connect/sendmsg decision taken by a kernel program.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NetworkDecision {
    /// When the kernel decided (see [`ClockOffset`] to convert `bpf_ktime_get_ns`).
    pub time: OffsetDateTime,
    /// `egress.sandbox.name`.
    pub sandbox: String,
    /// `egress.sandbox.cgroup_id`: the cgroup the socket's task was in.
    pub cgroup_id: u64,
    /// `process.pid` (thread-group id).
    pub pid: u32,
    /// `process.name`: the task's `comm`.
    pub process_name: String,
    /// `user.id`.
    pub uid: u32,
    /// `group.id`.
    pub gid: u32,
    /// `egress.socket.cookie`.
    pub socket_cookie: u64,
    /// `egress.netns.cookie`.
    pub netns_cookie: u64,
    /// `egress.hook`; also decides `event.action`.
    pub hook: Hook,
    /// `egress.socket.family`.
    pub family: SocketFamily,
    /// The socket's protocol as the kernel numbers it (`egress.socket.protocol`); also
    /// `network.iana_number` when it is an IANA number (MPTCP's 262 is not), and
    /// `network.transport` when known. 0 where unknown (a dropped IPv6 packet).
    pub protocol: u32,
    /// `destination.ip` as the socket saw it; an IPv4-mapped IPv6 address is recorded as
    /// the IPv4 address it maps (with `network.type` `ipv4`).
    pub destination_ip: IpAddr,
    /// `destination.port`.
    pub destination_port: u16,
    /// `egress.verdict`; also decides `event.outcome`.
    pub verdict: Verdict,
    /// `rule.name`.
    pub rule: RuleRef,
    /// `destination.domain`: the allowed name the destination address was learned from
    /// through the sandbox's resolver, when it was.
    pub domain: Option<String>,
    /// `egress.option`: the socket option or header refused (option and packet hooks).
    pub option: Option<RefusedOption>,
    /// `event.reason`: what was refused, in words (option, packet and LSM hooks).
    pub reason: Option<String>,
}

impl NetworkDecision {
    /// Converts a kernel event. The sandbox and rule names come from the daemon's tables,
    /// since the kernel only knows indices.
    pub fn from_event(
        event: &ConnectEvent,
        clock: &ClockOffset,
        sandbox: String,
        rule: RuleRef,
    ) -> Result<Self, DecodeError> {
        let hook = Hook::from_abi(event.hook).ok_or(DecodeError::Hook(event.hook))?;
        let verdict =
            Verdict::from_abi(event.verdict).ok_or(DecodeError::Verdict(event.verdict))?;
        let family = match (hook, event.family) {
            (Hook::LsmSocketCreate, _) => SocketFamily::from_af(event.opt_level),
            (Hook::Setsockopt | Hook::SkbEgress, 4) => SocketFamily::Inet,
            (Hook::Setsockopt | Hook::SkbEgress, 6) => SocketFamily::Inet6,
            (_, f) if hook.family().map(SocketFamily::abi) == Some(f) => SocketFamily::from_abi(f),
            (_, family) => return Err(DecodeError::Family { hook, family }),
        };
        let destination_ip = match event.family {
            4 => {
                let [a, b, c, d, ..] = event.addr;
                IpAddr::from([a, b, c, d])
            }
            6 => IpAddr::from(event.addr),
            _ => IpAddr::from([0u8; 4]),
        };
        let option = RefusedOption::from_event(hook, event.opt_level, event.opt_name);
        let comm_len = event
            .comm
            .iter()
            .position(|&b| b == 0)
            .unwrap_or(event.comm.len());
        let mut rec = Self {
            time: clock.to_wall(event.ts_ns),
            sandbox,
            cgroup_id: event.cgroup_id,
            pid: event.pid,
            process_name: String::from_utf8_lossy(&event.comm[..comm_len]).into_owned(),
            uid: event.uid,
            gid: event.gid,
            socket_cookie: event.socket_cookie,
            netns_cookie: event.netns_cookie,
            hook,
            family,
            protocol: event.protocol,
            destination_ip,
            destination_port: event.dst_port,
            verdict,
            rule,
            domain: None,
            option,
            reason: None,
        };
        rec.reason = rec.describe();
        Ok(rec)
    }

    /// What was refused, in words (option, packet and LSM hooks only).
    fn describe(&self) -> Option<String> {
        match self.hook {
            Hook::Setsockopt => self.option.as_ref().map(|o| {
                format!(
                    "{} set by setsockopt: {}; refused so packets go only to the judged address",
                    o.name,
                    o.meaning()
                )
            }),
            Hook::SkbEgress => self.option.as_ref().map(|o| {
                format!(
                    "packet to {} carried {} ({}); dropped",
                    self.destination_ip.to_canonical(),
                    o.name,
                    o.meaning()
                )
            }),
            Hook::LsmSocketCreate => Some(format!(
                "socket family {} refused: only unix, inet, inet6 and netlink sockets may be created in a sandbox",
                self.family.name()
            )),
            _ => None,
        }
    }

    /// `egress.connection.id`.
    pub fn connection_id(&self) -> ConnectionId {
        ConnectionId::new(self.netns_cookie, self.socket_cookie)
    }

    fn fill<'a>(&'a self, wire: &mut Wire<'a>) {
        let ip = self.destination_ip.to_canonical();
        wire.event.category = &["network"];
        wire.event.type_ = match self.verdict {
            Verdict::Deny => &["connection", "denied"],
            Verdict::Allow | Verdict::Audit | Verdict::Redirect => &["connection", "allowed"],
        };
        wire.event.outcome = self.verdict.outcome();
        wire.event.reason = self.reason.as_deref();
        // A dropped packet may be sent from a timer, where no task is the sender.
        if self.hook != Hook::SkbEgress {
            wire.process = Some(WireProcess {
                pid: self.pid,
                name: Some(&self.process_name),
            });
            wire.group = Some(WireId {
                id: self.gid.to_string(),
            });
        }
        wire.user = Some(WireId {
            id: self.uid.to_string(),
        });
        let net_type = match self.family {
            SocketFamily::Inet => Some("ipv4"),
            SocketFamily::Inet6 => Some(if ip.is_ipv4() { "ipv4" } else { "ipv6" }),
            SocketFamily::Other(_) => None,
        };
        let known_protocol = !(self.hook == Hook::SkbEgress && self.protocol == 0);
        if let Some(type_) = net_type {
            wire.network = Some(WireNetwork {
                type_,
                transport: known_protocol
                    .then(|| transport_name(self.protocol))
                    .flatten(),
                iana_number: (known_protocol && self.protocol <= 255)
                    .then(|| self.protocol.to_string()),
            });
        }
        if self.hook.has_destination() {
            wire.destination = Some(WireDestination {
                ip,
                port: (self.hook != Hook::SkbEgress).then_some(self.destination_port),
                domain: self.domain.as_deref(),
                bytes: None,
            });
        }
        wire.rule = Some(WireRule {
            name: self.rule.name(),
        });
        wire.egress.sandbox = Some(WireSandbox {
            name: &self.sandbox,
            cgroup_id: Some(self.cgroup_id),
            cgroup_path: None,
        });
        wire.egress.socket = Some(WireSocket {
            cookie: self.socket_cookie,
            family: self.family,
            protocol: self.protocol,
        });
        wire.egress.netns = Some(WireNetns {
            cookie: self.netns_cookie,
        });
        wire.egress.hook = Some(self.hook);
        wire.egress.verdict = Some(self.verdict);
        wire.egress.option = self.option.as_ref().map(|o| WireOption {
            name: o.name,
            type_: o.type_,
        });
        wire.egress.connection = Some(WireConnection {
            id: WireConnectionId::Kernel(self.connection_id()),
        });
    }
}

/// `egress.option`: a socket option or packet header refused because it would send packets
/// elsewhere than the judged address.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RefusedOption {
    /// The socket option (`IP_OPTIONS`, `IPV6_RTHDR`, ...) or header (`ipv4-options`,
    /// `ipv6-routing-header`).
    pub name: &'static str,
    /// IPv4 option type or IPv6 routing type, for packets.
    pub type_: Option<u16>,
}

impl RefusedOption {
    fn from_event(hook: Hook, level: u16, name: u16) -> Option<Self> {
        match hook {
            Hook::Setsockopt => Some(Self {
                name: sockopt_name(level, name),
                type_: None,
            }),
            Hook::SkbEgress if level == sockopt::IPPROTO_ROUTING => Some(Self {
                name: "ipv6-routing-header",
                type_: (name != u16::MAX).then_some(name),
            }),
            Hook::SkbEgress => Some(Self {
                name: "ipv4-options",
                type_: (name != 0).then_some(name),
            }),
            _ => None,
        }
    }

    /// What the option or header does, in words.
    pub fn meaning(&self) -> String {
        match (self.name, self.type_) {
            ("ipv4-options", Some(t)) if t == sockopt::IPOPT_LSRR => {
                "option 131, loose source route".into()
            }
            ("ipv4-options", Some(t)) if t == sockopt::IPOPT_SSRR => {
                "option 137, strict source route".into()
            }
            ("ipv4-options", Some(t)) => format!("first option type {t}"),
            ("ipv4-options", None) => "IPv4 header options".into(),
            ("ipv6-routing-header", Some(4)) => "routing type 4, segment routing".into(),
            ("ipv6-routing-header", Some(t)) => format!("routing type {t}"),
            ("ipv6-routing-header", None) => "more extension headers than the check walks".into(),
            ("IP_OPTIONS", _) => "IPv4 options, which can carry a source route".into(),
            ("IP_RETOPTS", _) => "IPv4 options".into(),
            ("IPV6_RTHDR" | "IPV6_2292RTHDR", _) => "an IPv6 routing header".into(),
            ("IPV6_2292PKTOPTIONS", _) => {
                "IPv6 sticky options, which can carry a routing header".into()
            }
            ("IPV6_NEXTHOP", _) => "an IPv6 next hop".into(),
            _ => "an option that routes packets".into(),
        }
    }
}

/// The name of a refused socket option.
fn sockopt_name(level: u16, name: u16) -> &'static str {
    match (level, name) {
        (sockopt::SOL_IP, sockopt::IP_OPTIONS) => "IP_OPTIONS",
        (sockopt::SOL_IP, sockopt::IP_RETOPTS) => "IP_RETOPTS",
        (sockopt::SOL_IPV6, sockopt::IPV6_RTHDR) => "IPV6_RTHDR",
        (sockopt::SOL_IPV6, sockopt::IPV6_2292RTHDR) => "IPV6_2292RTHDR",
        (sockopt::SOL_IPV6, sockopt::IPV6_2292PKTOPTIONS) => "IPV6_2292PKTOPTIONS",
        (sockopt::SOL_IPV6, sockopt::IPV6_NEXTHOP) => "IPV6_NEXTHOP",
        _ => "unknown",
    }
}

/// A kernel event the daemon cannot turn into a [`NetworkDecision`].
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DecodeError {
    #[error("unknown hook id {0} in kernel event (known: 1-9)")]
    Hook(u8),
    #[error("unknown verdict id {0} in kernel event (known: 1-4)")]
    Verdict(u8),
    #[error("kernel event from {hook} carries address family {family}, which it cannot")]
    Family { hook: Hook, family: u8 },
}

/// Kernel events that could not be delivered (ring buffer full, or dropped while no daemon
/// was reading).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EventsLost {
    pub time: OffsetDateTime,
    /// `egress.lost.count`: lost since the previous `events-lost` record.
    pub count: u64,
    /// `egress.lost.total`: lost since the counters were created.
    pub total: u64,
}

/// Audit records that were given sequence numbers but never reached the log: the log
/// could not be written for longer than the writer's queue lasted, or the daemon stopped
/// before it could write them. The numbers form one range; no other record uses them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AuditLost {
    pub time: OffsetDateTime,
    /// `egress.audit_lost.count`: how many records were lost (the size of the range).
    pub count: u64,
    /// `egress.audit_lost.first_sequence`: the first lost `event.sequence`.
    pub first_sequence: u64,
    /// `egress.audit_lost.last_sequence`: the last lost `event.sequence`.
    pub last_sequence: u64,
    /// `egress.audit_lost.since`: when writes began to fail, when this daemon saw it.
    pub since: Option<OffsetDateTime>,
    /// `error.message`: the write error, or why the records were not written.
    pub error: String,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DaemonStart {
    pub time: OffsetDateTime,
    /// `process.pid` of the daemon.
    pub pid: u32,
    /// `egress.daemon.adopted_sandboxes`: sandboxes taken over from a previous run.
    pub adopted_sandboxes: u32,
    /// `egress.gap.previous_seen`: set only after an unclean stop, to the last time the
    /// previous daemon was known alive; `egress.gap.seconds` is computed from it.
    pub previous_seen: Option<OffsetDateTime>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DaemonStop {
    pub time: OffsetDateTime,
    /// `process.pid` of the daemon.
    pub pid: u32,
    /// `event.reason`.
    pub reason: StopReason,
}

/// Why the daemon stops: `event.reason` of a `daemon-stop` record.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StopReason {
    /// SIGTERM or SIGINT.
    Signal,
    /// Asked to over the control socket.
    Request,
    /// A fatal error; `event.outcome` is `failure`.
    Error,
}

impl StopReason {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Signal => "signal",
            Self::Request => "request",
            Self::Error => "error",
        }
    }

    fn outcome(self) -> Outcome {
        match self {
            Self::Signal | Self::Request => Outcome::Success,
            Self::Error => Outcome::Failure,
        }
    }
}

/// Body of `sandbox-attach`, `sandbox-detach` and `sandbox-adopt`; wrap it with
/// [`Record::SandboxAttach`] and friends.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SandboxLifecycle {
    pub time: OffsetDateTime,
    /// `egress.sandbox.name`.
    pub sandbox: String,
    /// `egress.sandbox.cgroup_path`.
    pub cgroup_path: PathBuf,
    /// `egress.sandbox.cgroup_id`.
    pub cgroup_id: u64,
    /// `egress.policy.path`.
    pub policy_path: PathBuf,
    /// `egress.policy.digest`.
    pub policy_digest: PolicyDigest,
    /// `event.reason` of a `sandbox-detach` record: why the confinement ended.
    pub reason: Option<DetachReason>,
    /// `egress.coverage.packet_sockets` (attach and adopt): whether the sandbox is kept from
    /// creating packet and other non-inet sockets (BPF LSM active and attached).
    pub packet_sockets_covered: Option<bool>,
    /// `egress.posture` (attach and adopt): what the sandbox's processes hold.
    pub posture: Option<crate::posture::Posture>,
}

/// Why a sandbox was detached: `event.reason` of a `sandbox-detach` record.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum DetachReason {
    /// `egressctl detach` (or another control-socket client that gave no reason).
    Operator,
    /// A container runtime's `poststop` hook (`egressctl oci-hook`).
    Hook,
    /// The sandbox's cgroup directory was removed (or replaced by a new one at the same path).
    CgroupRemoved,
}

impl DetachReason {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Operator => "operator",
            Self::Hook => "hook",
            Self::CgroupRemoved => "cgroup-removed",
        }
    }
}

impl SandboxLifecycle {
    fn fill<'a>(&'a self, wire: &mut Wire<'a>, type_: &'static [&'static str]) {
        wire.egress.coverage = self
            .packet_sockets_covered
            .map(|packet_sockets| WireCoverage { packet_sockets });
        wire.egress.posture = self.posture.as_ref().map(|p| WirePosture {
            processes: p.pids.len(),
            capabilities: p.capabilities(),
            risky_capabilities: p.risky(),
            can_leave_cgroup: p.can_leave_cgroup(),
        });
        wire.event.type_ = type_;
        wire.event.reason = self.reason.map(DetachReason::as_str);
        wire.egress.sandbox = Some(WireSandbox {
            name: &self.sandbox,
            cgroup_id: Some(self.cgroup_id),
            cgroup_path: Some(self.cgroup_path.to_string_lossy()),
        });
        wire.egress.policy = Some(WirePolicy {
            path: self.policy_path.to_string_lossy(),
            digest: Some(&self.policy_digest),
            previous_digest: None,
        });
    }
}

/// Body of `sandbox-quarantine` and `sandbox-release`; wrap it with
/// [`Record::SandboxQuarantine`] or [`Record::SandboxRelease`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Quarantine {
    pub time: OffsetDateTime,
    /// `egress.sandbox.name`.
    pub sandbox: String,
    /// `egress.sandbox.cgroup_path`.
    pub cgroup_path: PathBuf,
    /// `egress.sandbox.cgroup_id`.
    pub cgroup_id: u64,
    /// `event.reason`: why, in the operator's words or the alert's.
    pub reason: Option<String>,
    /// `egress.quarantine.trigger`: `operator`, or the alert kind whose configured
    /// response it was (`denial-burst`, ...).
    pub trigger: String,
}

impl Quarantine {
    fn fill<'a>(&'a self, wire: &mut Wire<'a>) {
        wire.event.type_ = &["change"];
        wire.event.reason = non_empty(&self.reason);
        wire.egress.sandbox = Some(WireSandbox {
            name: &self.sandbox,
            cgroup_id: Some(self.cgroup_id),
            cgroup_path: Some(self.cgroup_path.to_string_lossy()),
        });
        wire.egress.quarantine = Some(WireQuarantine {
            trigger: &self.trigger,
        });
    }
}

/// `credential-revoke`: what quarantine (or the detach of the last sandbox using a leased
/// credential) did to one credential's live value. Names only.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CredentialRevoke {
    pub time: OffsetDateTime,
    /// `egress.sandbox.name`: the quarantined (or detached) sandbox whose policy names it.
    pub sandbox: String,
    /// `egress.credential.name`.
    pub credential: String,
    /// `event.outcome`: whether the revocation succeeded.
    pub revoked: bool,
    /// `event.reason`: how it was revoked, or why it failed (never the value).
    pub reason: String,
}

impl CredentialRevoke {
    fn fill<'a>(&'a self, wire: &mut Wire<'a>) {
        wire.event.category = &["iam"];
        wire.event.type_ = &["deletion"];
        wire.event.outcome = if self.revoked {
            Outcome::Success
        } else {
            Outcome::Failure
        };
        wire.event.reason = Some(&self.reason);
        wire.egress.sandbox = Some(WireSandbox::named(&self.sandbox));
        wire.egress.credential = Some(WireCredential {
            name: &self.credential,
        });
    }
}

/// A sandbox's policy was replaced.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PolicyChange {
    pub time: OffsetDateTime,
    /// `egress.sandbox.name`.
    pub sandbox: String,
    /// `egress.policy.path` of the new policy.
    pub policy_path: PathBuf,
    /// `egress.policy.previous_digest`.
    pub previous_digest: PolicyDigest,
    /// `egress.policy.digest`.
    pub digest: PolicyDigest,
}

/// A policy was refused.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PolicyRejected {
    pub time: OffsetDateTime,
    /// `egress.sandbox.name` the policy was meant for.
    pub sandbox: String,
    /// `egress.policy.path`.
    pub policy_path: PathBuf,
    /// `egress.policy.digest` of the refused contents, when they could be read.
    pub policy_digest: Option<PolicyDigest>,
    /// `error.message`: the policy compiler's message (file, line, field, what is valid).
    /// Policy errors never quote credential values, which live outside policy files.
    pub error: String,
}

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
    fn verdict(&self) -> Verdict {
        match self.record.verdict {
            proxy::Verdict::Allow => Verdict::Allow,
            proxy::Verdict::Deny => Verdict::Deny,
        }
    }

    fn fill<'a>(&'a self, wire: &mut Wire<'a>) {
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
                let query = r
                    .query_keys
                    .as_deref()
                    .and_then(|q| proxy::query_keys(Some(q)));
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
        wire.egress.credential = non_empty(&r.credential).map(|name| WireCredential { name });
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

/// A DNS query from a sandbox, as its resolver handled it: answered from upstream,
/// answered NXDOMAIN because the policy does not allow the name, refused, or failed.
///
/// Written with the ECS `dns.*` fields; the upstream resolver that answered is
/// `server.ip`/`server.port` (ECS: the server side of the exchange the resolver made).
/// The name is recorded lower-case without its trailing dot, so letter case cannot carry
/// data into the log.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DnsEvent {
    /// `@timestamp`: when the resolver finished with the query.
    pub time: OffsetDateTime,
    /// `egress.sandbox.name`.
    pub sandbox: String,
    /// `dns.question.name`; empty when the query could not be parsed (then the question
    /// is left out).
    pub question_name: String,
    /// `dns.question.type`, e.g. `A`, `AAAA`, `HTTPS`, or `TYPE65280` for unnamed types.
    pub question_type: String,
    /// `dns.response_code` sent to the sandbox: `NOERROR`, `NXDOMAIN`, `REFUSED`,
    /// `SERVFAIL`, `FORMERR`, or whatever other code the upstream resolver answered.
    pub response_code: String,
    /// `dns.resolved_ip`: the A/AAAA addresses released to the sandbox (and installed in
    /// the kernel before that), and only those. IPv4-mapped addresses are written as IPv4.
    pub resolved_ip: Vec<IpAddr>,
    /// `egress.dns.refused`: addresses the upstream answer held that were neither
    /// installed nor released (a special address, outside the rule's `answers`, covered
    /// by a deny rule, ...), each with why.
    pub refused: Vec<RefusedAnswer>,
    /// `egress.verdict`; also decides `event.outcome` and `event.type`.
    pub verdict: DnsVerdict,
    /// `rule.name`: the first policy rule that allows the name; for a denied name, the
    /// `deny` rule that matched it, if any.
    pub rule: Option<String>,
    /// `event.reason`: why a query was denied, or what failed after it was allowed.
    pub reason: Option<String>,
    /// `server.ip` and `server.port`: the upstream resolver that answered, or the last one
    /// tried.
    pub upstream: Option<SocketAddr>,
}

/// An answer's address the resolver did not release, and why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RefusedAnswer {
    pub ip: IpAddr,
    pub reason: String,
}

impl DnsEvent {
    fn fill<'a>(&'a self, wire: &mut Wire<'a>) {
        let verdict = self.verdict.as_verdict();
        wire.event.category = &["network"];
        wire.event.type_ = match self.verdict {
            DnsVerdict::Allow => &["protocol", "allowed"],
            DnsVerdict::Deny => &["protocol", "denied"],
        };
        // As for the proxy: only a deny failed; an allowed query whose upstream then failed
        // is a success whose `event.reason` says what went wrong.
        wire.event.outcome = verdict.outcome();
        wire.event.reason = non_empty(&self.reason);
        wire.dns = Some(WireDns {
            question: (!self.question_name.is_empty()).then_some(WireDnsQuestion {
                name: &self.question_name,
                type_: &self.question_type,
            }),
            response_code: &self.response_code,
            resolved_ip: self
                .resolved_ip
                .iter()
                .map(|ip| ip.to_canonical())
                .collect(),
        });
        wire.server = self.upstream.map(|a| WireServer {
            ip: a.ip().to_canonical(),
            port: a.port(),
        });
        wire.rule = non_empty(&self.rule).map(|name| WireRule { name });
        wire.egress.sandbox = Some(WireSandbox::named(&self.sandbox));
        wire.egress.verdict = Some(verdict);
        wire.egress.dns = (!self.refused.is_empty()).then(|| WireEgressDns {
            refused: self
                .refused
                .iter()
                .map(|r| WireRefusedAnswer {
                    ip: r.ip.to_canonical(),
                    reason: &r.reason,
                })
                .collect(),
        });
    }
}

/// `egress.verdict` of a DNS query: the resolver answers for a name or it does not.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DnsVerdict {
    Allow,
    Deny,
}

impl DnsVerdict {
    fn as_verdict(self) -> Verdict {
        match self {
            Self::Allow => Verdict::Allow,
            Self::Deny => Verdict::Deny,
        }
    }
}

fn fill_alert<'a>(r: &'a Alert, wire: &mut Wire<'a>) {
    wire.event.kind = "alert";
    wire.event.category = &["intrusion_detection"];
    wire.event.type_ = &["info"];
    wire.event.outcome = Outcome::Success;
    wire.event.reason = Some(&r.reason);
    wire.url = WireUrl::new(non_empty(&r.domain), non_empty(&r.path), None);
    wire.rule = non_empty(&r.rule).map(|name| WireRule { name });
    wire.egress.sandbox = Some(WireSandbox::named(&r.sandbox));
    wire.egress.credential = non_empty(&r.credential).map(|name| WireCredential { name });
    wire.egress.alert = Some(WireAlert {
        count: r.count.max(1),
        window_seconds: r.window_seconds,
        response: r.response.as_str(),
    });
}

/// An optional string, with an empty one taken as absent.
fn non_empty(s: &Option<String>) -> Option<&str> {
    s.as_deref().filter(|s| !s.is_empty())
}

// ---------------------------------------------------------------------------------------
// Value types
// ---------------------------------------------------------------------------------------

/// `egress.verdict`: what the kernel program returned.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Verdict {
    Allow,
    Deny,
    /// Allowed only because the sandbox default is `audit`; the policy would have denied it.
    Audit,
    /// Rewritten to the local proxy.
    Redirect,
}

impl Verdict {
    /// From `agent_common::verdict::*`.
    pub fn from_abi(v: u8) -> Option<Self> {
        match v {
            verdict::ALLOW => Some(Self::Allow),
            verdict::DENY => Some(Self::Deny),
            verdict::AUDIT => Some(Self::Audit),
            verdict::REDIRECT => Some(Self::Redirect),
            _ => None,
        }
    }

    /// `event.outcome`: whether the connection went ahead.
    fn outcome(self) -> Outcome {
        match self {
            Self::Allow | Self::Audit | Self::Redirect => Outcome::Success,
            Self::Deny => Outcome::Failure,
        }
    }
}

/// `egress.hook`: the kernel program that decided.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Hook {
    Connect4,
    Connect6,
    Sendmsg4,
    Sendmsg6,
    /// A raw, ICMP or other non-TCP/UDP socket refused at creation.
    #[serde(rename = "sock_create4")]
    SockCreate4,
    #[serde(rename = "sock_create6")]
    SockCreate6,
    /// A source-routing socket option refused.
    Setsockopt,
    /// A packet with IPv4 options or an IPv6 routing header dropped.
    #[serde(rename = "skb_egress")]
    SkbEgress,
    /// A socket of a family other than unix, inet, inet6 and netlink refused (BPF LSM).
    #[serde(rename = "lsm_socket_create")]
    LsmSocketCreate,
}

impl Hook {
    /// From `agent_common::hook::*`.
    pub fn from_abi(v: u8) -> Option<Self> {
        match v {
            hook::CONNECT4 => Some(Self::Connect4),
            hook::CONNECT6 => Some(Self::Connect6),
            hook::SENDMSG4 => Some(Self::Sendmsg4),
            hook::SENDMSG6 => Some(Self::Sendmsg6),
            hook::SOCK_CREATE4 => Some(Self::SockCreate4),
            hook::SOCK_CREATE6 => Some(Self::SockCreate6),
            hook::SETSOCKOPT => Some(Self::Setsockopt),
            hook::SKB_EGRESS => Some(Self::SkbEgress),
            hook::LSM_SOCKET_CREATE => Some(Self::LsmSocketCreate),
            _ => None,
        }
    }

    /// The socket family a hook implies, for hooks that run for one family only.
    pub fn family(self) -> Option<SocketFamily> {
        match self {
            Self::Connect4 | Self::Sendmsg4 | Self::SockCreate4 => Some(SocketFamily::Inet),
            Self::Connect6 | Self::Sendmsg6 | Self::SockCreate6 => Some(SocketFamily::Inet6),
            Self::Setsockopt | Self::SkbEgress | Self::LsmSocketCreate => None,
        }
    }

    /// Whether records of this hook carry a destination (an option or a socket being
    /// created has none yet).
    pub fn has_destination(self) -> bool {
        !matches!(self, Self::Setsockopt | Self::LsmSocketCreate)
    }

    /// `event.action`.
    pub fn action(self) -> &'static str {
        match self {
            Self::Connect4 | Self::Connect6 => action::CONNECT,
            Self::Sendmsg4 | Self::Sendmsg6 => action::SENDMSG,
            Self::SockCreate4 | Self::SockCreate6 | Self::LsmSocketCreate => action::SOCKET,
            Self::Setsockopt => action::SETSOCKOPT,
            Self::SkbEgress => action::PACKET,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Connect4 => "connect4",
            Self::Connect6 => "connect6",
            Self::Sendmsg4 => "sendmsg4",
            Self::Sendmsg6 => "sendmsg6",
            Self::SockCreate4 => "sock_create4",
            Self::SockCreate6 => "sock_create6",
            Self::Setsockopt => "setsockopt",
            Self::SkbEgress => "skb_egress",
            Self::LsmSocketCreate => "lsm_socket_create",
        }
    }
}

impl fmt::Display for Hook {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// `egress.socket.family`: `inet`, `inet6`, or the name of another family a sandbox
/// tried to create (`packet`, `xdp`, `vsock`, ...; `af-N` when unnamed).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SocketFamily {
    Inet,
    Inet6,
    /// Another `AF_*` number.
    Other(u16),
}

impl SocketFamily {
    /// The `family` byte kernel events carry (4 or 6).
    fn abi(self) -> u8 {
        match self {
            Self::Inet => 4,
            Self::Inet6 => 6,
            Self::Other(_) => 0,
        }
    }

    fn from_abi(v: u8) -> Self {
        if v == 6 {
            Self::Inet6
        } else {
            Self::Inet
        }
    }

    /// From the kernel's `AF_*` number.
    pub fn from_af(af: u16) -> Self {
        match af {
            2 => Self::Inet,
            10 => Self::Inet6,
            n => Self::Other(n),
        }
    }

    /// The record's name for the family.
    pub fn name(self) -> Cow<'static, str> {
        let named = match self {
            Self::Inet => "inet",
            Self::Inet6 => "inet6",
            Self::Other(n) => match n {
                1 => "unix",
                3 => "ax25",
                4 => "ipx",
                5 => "appletalk",
                9 => "x25",
                16 => "netlink",
                17 => "packet",
                21 => "rds",
                24 => "pppox",
                26 => "llc",
                27 => "ib",
                28 => "mpls",
                29 => "can",
                30 => "tipc",
                31 => "bluetooth",
                34 => "isdn",
                35 => "phonet",
                36 => "ieee802154",
                37 => "caif",
                38 => "alg",
                39 => "nfc",
                40 => "vsock",
                41 => "kcm",
                42 => "qipcrtr",
                43 => "smc",
                44 => "xdp",
                45 => "mctp",
                n => return Cow::Owned(format!("af-{n}")),
            },
        };
        Cow::Borrowed(named)
    }
}

impl Serialize for SocketFamily {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.name())
    }
}

/// `rule.name`: the matching rule, or the sandbox default.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RuleRef {
    /// Recorded as `default`; policy rule names cannot take that name.
    Default,
    Named(String),
}

impl RuleRef {
    pub fn name(&self) -> &str {
        match self {
            Self::Default => "default",
            Self::Named(name) => name,
        }
    }
}

/// sha256 of a policy file's bytes, lowercase hex.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(transparent)]
pub struct PolicyDigest(String);

impl PolicyDigest {
    /// Digest of the policy file contents exactly as read.
    pub fn of(contents: &[u8]) -> Self {
        let hash = Sha256::digest(contents);
        let mut hex = String::with_capacity(64);
        for byte in hash.iter() {
            hex.push(char::from(HEX[usize::from(byte >> 4)]));
            hex.push(char::from(HEX[usize::from(byte & 0xf)]));
        }
        Self(hex)
    }

    /// Accepts a digest stored earlier (64 lowercase hex digits).
    pub fn from_hex(hex: &str) -> Option<Self> {
        (hex.len() == 64 && hex.bytes().all(|b| HEX.contains(&b))).then(|| Self(hex.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

const HEX: &[u8; 16] = b"0123456789abcdef";

impl fmt::Display for PolicyDigest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// `egress.connection.id`: identifies one socket across the kernel record and the proxy's
/// records. Socket cookies are unique per boot; the netns cookie makes the id say where
/// it lives. Written as `<netns cookie>-<socket cookie>`, each 16 lowercase hex digits.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ConnectionId {
    pub netns_cookie: u64,
    pub socket_cookie: u64,
}

impl ConnectionId {
    pub fn new(netns_cookie: u64, socket_cookie: u64) -> Self {
        Self {
            netns_cookie,
            socket_cookie,
        }
    }
}

impl fmt::Display for ConnectionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:016x}-{:016x}", self.netns_cookie, self.socket_cookie)
    }
}

impl Serialize for ConnectionId {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// ECS `network.transport`: the IANA keyword, for the protocols we can name; MPTCP
/// (the kernel's 262) is named too, since calling it TCP would hide it.
fn transport_name(protocol: u32) -> Option<&'static str> {
    match protocol {
        1 => Some("icmp"),
        6 => Some("tcp"),
        17 => Some("udp"),
        58 => Some("ipv6-icmp"),
        132 => Some("sctp"),
        262 => Some("mptcp"),
        _ => None,
    }
}

/// ECS `event.outcome`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
enum Outcome {
    Success,
    Failure,
}

// ---------------------------------------------------------------------------------------
// Wire layout: borrowed views in ECS nesting, built per write.
// ---------------------------------------------------------------------------------------

#[derive(Serialize)]
struct Wire<'a> {
    #[serde(rename = "@timestamp")]
    timestamp: String,
    ecs: Ecs,
    event: WireEvent<'a>,
    observer: Observer,
    #[serde(skip_serializing_if = "Option::is_none")]
    process: Option<WireProcess<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    user: Option<WireId>,
    #[serde(skip_serializing_if = "Option::is_none")]
    group: Option<WireId>,
    #[serde(skip_serializing_if = "Option::is_none")]
    network: Option<WireNetwork>,
    #[serde(skip_serializing_if = "Option::is_none")]
    source: Option<WireBytes>,
    #[serde(skip_serializing_if = "Option::is_none")]
    destination: Option<WireDestination<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    url: Option<WireUrl<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    http: Option<WireHttp<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    tls: Option<WireTls<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    dns: Option<WireDns<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    server: Option<WireServer>,
    #[serde(skip_serializing_if = "Option::is_none")]
    rule: Option<WireRule<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<WireError<'a>>,
    egress: WireEgress<'a>,
}

#[derive(Serialize)]
struct Ecs {
    version: &'static str,
}

#[derive(Serialize)]
struct WireEvent<'a> {
    kind: &'static str,
    category: &'static [&'static str],
    #[serde(rename = "type")]
    type_: &'static [&'static str],
    action: &'static str,
    outcome: Outcome,
    #[serde(skip_serializing_if = "Option::is_none")]
    reason: Option<&'a str>,
    /// Nanoseconds, as ECS defines it.
    #[serde(skip_serializing_if = "Option::is_none")]
    duration: Option<u64>,
    sequence: u64,
}

#[derive(Serialize)]
struct Observer {
    product: &'static str,
    version: &'static str,
}

#[derive(Serialize)]
struct WireProcess<'a> {
    pid: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    name: Option<&'a str>,
}

#[derive(Serialize)]
struct WireId {
    id: String,
}

#[derive(Serialize)]
struct WireNetwork {
    #[serde(rename = "type")]
    type_: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    transport: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    iana_number: Option<String>,
}

#[derive(Serialize)]
struct WireDestination<'a> {
    ip: IpAddr,
    #[serde(skip_serializing_if = "Option::is_none")]
    port: Option<u16>,
    /// The name an allowed address was learned from (DNS).
    #[serde(skip_serializing_if = "Option::is_none")]
    domain: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    bytes: Option<u64>,
}

/// `source`, `http.request.body` and `http.response.body`.
#[derive(Serialize)]
struct WireBytes {
    bytes: u64,
}

#[derive(Serialize)]
struct WireUrl<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    domain: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    path: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    query: Option<String>,
}

impl<'a> WireUrl<'a> {
    /// `None` rather than an empty `url` object.
    fn new(domain: Option<&'a str>, path: Option<&'a str>, query: Option<String>) -> Option<Self> {
        (domain.is_some() || path.is_some() || query.is_some()).then_some(Self {
            domain,
            path,
            query,
        })
    }
}

#[derive(Serialize)]
struct WireHttp<'a> {
    request: WireHttpRequest<'a>,
    response: WireHttpResponse,
}

#[derive(Serialize)]
struct WireHttpRequest<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    method: Option<&'a str>,
    body: WireBytes,
}

#[derive(Serialize)]
struct WireHttpResponse {
    #[serde(skip_serializing_if = "Option::is_none")]
    status_code: Option<u16>,
    body: WireBytes,
}

#[derive(Serialize)]
struct WireTls<'a> {
    client: WireTlsClient<'a>,
}

#[derive(Serialize)]
struct WireTlsClient<'a> {
    server_name: &'a str,
}

#[derive(Serialize)]
struct WireDns<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    question: Option<WireDnsQuestion<'a>>,
    response_code: &'a str,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    resolved_ip: Vec<IpAddr>,
}

#[derive(Serialize)]
struct WireDnsQuestion<'a> {
    name: &'a str,
    #[serde(rename = "type")]
    type_: &'a str,
}

#[derive(Serialize)]
struct WireServer {
    ip: IpAddr,
    port: u16,
}

#[derive(Serialize)]
struct WireRule<'a> {
    name: &'a str,
}

#[derive(Serialize)]
struct WireError<'a> {
    message: &'a str,
}

#[derive(Default, Serialize)]
struct WireEgress<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    sandbox: Option<WireSandbox<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    socket: Option<WireSocket>,
    #[serde(skip_serializing_if = "Option::is_none")]
    netns: Option<WireNetns>,
    #[serde(skip_serializing_if = "Option::is_none")]
    hook: Option<Hook>,
    #[serde(skip_serializing_if = "Option::is_none")]
    verdict: Option<Verdict>,
    #[serde(skip_serializing_if = "Option::is_none")]
    option: Option<WireOption>,
    #[serde(skip_serializing_if = "Option::is_none")]
    connection: Option<WireConnection<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    tls_mode: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    credential: Option<WireCredential<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    scrubbed: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    git: Option<WireGit<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    lost: Option<WireLost>,
    #[serde(skip_serializing_if = "Option::is_none")]
    audit_lost: Option<WireAuditLost>,
    #[serde(skip_serializing_if = "Option::is_none")]
    daemon: Option<WireDaemon>,
    #[serde(skip_serializing_if = "Option::is_none")]
    gap: Option<WireGap>,
    #[serde(skip_serializing_if = "Option::is_none")]
    policy: Option<WirePolicy<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    alert: Option<WireAlert>,
    #[serde(skip_serializing_if = "Option::is_none")]
    quarantine: Option<WireQuarantine<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    dns: Option<WireEgressDns<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    coverage: Option<WireCoverage>,
    #[serde(skip_serializing_if = "Option::is_none")]
    posture: Option<WirePosture>,
}

#[derive(Serialize)]
struct WireQuarantine<'a> {
    trigger: &'a str,
}

/// `egress.dns`: what the resolver kept from the sandbox.
#[derive(Serialize)]
struct WireEgressDns<'a> {
    refused: Vec<WireRefusedAnswer<'a>>,
}

#[derive(Serialize)]
struct WireRefusedAnswer<'a> {
    ip: IpAddr,
    reason: &'a str,
}

#[derive(Serialize)]
struct WirePosture {
    processes: usize,
    capabilities: Vec<&'static str>,
    risky_capabilities: Vec<&'static str>,
    can_leave_cgroup: bool,
}

#[derive(Serialize)]
struct WireCoverage {
    packet_sockets: bool,
}

#[derive(Serialize)]
struct WireSandbox<'a> {
    name: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    cgroup_id: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    cgroup_path: Option<Cow<'a, str>>,
}

impl<'a> WireSandbox<'a> {
    fn named(name: &'a str) -> Self {
        Self {
            name,
            cgroup_id: None,
            cgroup_path: None,
        }
    }
}

#[derive(Serialize)]
struct WireSocket {
    cookie: u64,
    family: SocketFamily,
    /// The kernel's protocol number, full width.
    protocol: u32,
}

#[derive(Serialize)]
struct WireOption {
    name: &'static str,
    #[serde(rename = "type", skip_serializing_if = "Option::is_none")]
    type_: Option<u16>,
}

#[derive(Serialize)]
struct WireNetns {
    cookie: u64,
}

#[derive(Serialize)]
struct WireConnection<'a> {
    id: WireConnectionId<'a>,
}

/// The kernel record builds the id from its cookies; the proxy hands over the same id
/// already written out.
#[derive(Serialize)]
#[serde(untagged)]
enum WireConnectionId<'a> {
    Kernel(ConnectionId),
    Proxy(&'a str),
}

/// `egress.credential`: the name only; the value never reaches the audit code.
#[derive(Serialize)]
struct WireCredential<'a> {
    name: &'a str,
}

/// `egress.git`: the repository, service and, for a push, its ref updates.
#[derive(Serialize)]
struct WireGit<'a> {
    repo: &'a str,
    service: &'a str,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    ref_updates: Vec<WireRefUpdate<'a>>,
}

#[derive(Serialize)]
struct WireRefUpdate<'a> {
    ref_name: &'a str,
    old: &'a str,
    new: &'a str,
    allowed: bool,
}

#[derive(Serialize)]
struct WireLost {
    count: u64,
    total: u64,
}

#[derive(Serialize)]
struct WireAuditLost {
    count: u64,
    first_sequence: u64,
    last_sequence: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    since: Option<String>,
}

#[derive(Serialize)]
struct WireDaemon {
    adopted_sandboxes: u32,
}

#[derive(Serialize)]
struct WireGap {
    previous_seen: String,
    seconds: f64,
}

#[derive(Serialize)]
struct WirePolicy<'a> {
    path: Cow<'a, str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    digest: Option<&'a PolicyDigest>,
    #[serde(skip_serializing_if = "Option::is_none")]
    previous_digest: Option<&'a PolicyDigest>,
}

#[derive(Serialize)]
struct WireAlert {
    count: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    window_seconds: Option<u64>,
    response: &'static str,
}
