//! Records of kernel decisions: connect/sendmsg verdicts, refused socket options and
//! packets, lost kernel events; and the kernel-side value types they carry.

use std::{borrow::Cow, fmt, net::IpAddr};

use agent_common::{hook, sockopt, sysctl, verdict, ConnectEvent};
use serde::{Serialize, Serializer};
use time::OffsetDateTime;

use super::*;

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
            // No socket: the record has none.
            (Hook::Sysctl, _) => SocketFamily::Other(0),
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
            protocol: u32::from(event.protocol),
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
    pub(super) fn describe(&self) -> Option<String> {
        match self.hook {
            Hook::Setsockopt => self.option.as_ref().map(|o| {
                format!(
                    "{} set by setsockopt: {}; refused so packets go only to the judged address",
                    o.name,
                    o.meaning()
                )
            }),
            Hook::SkbEgress
                if self.option.as_ref().is_some_and(RefusedOption::is_quarantine) =>
            {
                Some(format!(
                    "packet to {} from a sandbox denied everything (quarantined, or its \
                     policy could not be restored) on a connection or socket opened before; \
                     dropped",
                    self.destination_ip.to_canonical()
                ))
            }
            Hook::SkbEgress
                if self
                    .option
                    .as_ref()
                    .is_some_and(|o| o.name == "loopback-off-link") =>
            {
                Some(format!(
                    "packet to loopback address {} leaving by another device than loopback \
                     (a socket bound to a device would send it to the next hop); dropped",
                    self.destination_ip.to_canonical()
                ))
            }
            Hook::SkbEgress => self.option.as_ref().map(|o| {
                format!(
                    "packet to {} carried {} ({}); dropped",
                    self.destination_ip.to_canonical(),
                    o.name,
                    o.meaning()
                )
            }),
            Hook::Sysctl => self.option.as_ref().map(|o| {
                format!(
                    "write to the network sysctl {} of the sandbox's namespace: {}; refused",
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

    pub(super) fn fill<'a>(&'a self, wire: &mut Wire<'a>) {
        let ip = self.destination_ip.to_canonical();
        wire.event.category = &["network"];
        wire.event.type_ = match self.verdict {
            Verdict::Deny => &["connection", "denied"],
            Verdict::Allow | Verdict::Audit | Verdict::Redirect => &["connection", "allowed"],
        };
        wire.event.outcome = self.verdict.outcome();
        wire.event.reason = self.reason.as_deref();
        // A dropped packet may be sent from a timer, where no task is the sender; a
        // connection the daemon closed was not closed by any of the sandbox's tasks.
        if !matches!(self.hook, Hook::SkbEgress | Hook::PolicyChange) {
            wire.process = Some(WireProcess {
                pid: self.pid,
                name: Some(&self.process_name),
            });
            wire.group = Some(WireId {
                id: NumberText(self.gid),
            });
        }
        wire.user = Some(WireId {
            id: NumberText(self.uid),
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
                    .then_some(NumberText(self.protocol)),
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
        wire.egress.socket = (self.hook != Hook::Sysctl).then_some(WireSocket {
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
    pub(super) fn from_event(hook: Hook, level: u16, name: u16) -> Option<Self> {
        match hook {
            Hook::Setsockopt => Some(Self {
                name: sockopt_name(level, name),
                type_: None,
            }),
            Hook::SkbEgress if level == sockopt::QUARANTINED => Some(Self {
                name: "quarantine",
                type_: None,
            }),
            Hook::SkbEgress if level == sockopt::LOOPBACK_OFF_LINK => Some(Self {
                name: "loopback-off-link",
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
            Hook::Sysctl => Some(Self {
                name: match name {
                    sysctl::NONLOCAL_BIND => "ip_nonlocal_bind",
                    sysctl::RESERVED_PORTS => "ip_local_reserved_ports",
                    sysctl::ROUTE_LOCALNET => "route_localnet",
                    _ => "unknown",
                },
                type_: None,
            }),
            _ => None,
        }
    }

    /// Not an option: the packet of a sandbox denied everything (see
    /// [`sockopt::QUARANTINED`]).
    pub fn is_quarantine(&self) -> bool {
        self.name == "quarantine"
    }

    /// Whether it is an option or header that routes packets (what a `source-routing`
    /// alert summarises), not a drop for another reason.
    pub fn routes(&self) -> bool {
        !matches!(
            self.name,
            "quarantine"
                | "loopback-off-link"
                | "ip_nonlocal_bind"
                | "ip_local_reserved_ports"
                | "route_localnet"
        )
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
            ("IP_FREEBIND" | "IP_TRANSPARENT" | "IPV6_FREEBIND" | "IPV6_TRANSPARENT", _) => {
                "a source address that is not the host's (a forged source)".into()
            }
            ("IPV6_FLOWLABEL_MGR", _) => {
                "a flow label request with control data, which can carry a routing header".into()
            }
            (n, _)
                if n.contains("MEMBERSHIP")
                    || n.contains("SOURCE")
                    || n.contains("FILTER")
                    || n.contains("ANYCAST")
                    || n.starts_with("MCAST_") =>
            {
                "a multicast membership, which the kernel announces to the link itself".into()
            }
            ("quarantine", _) => "the sandbox is denied everything".into(),
            ("ip_nonlocal_bind", _) => {
                "binding to and sending from addresses that are not the host's (a forged \
                 source), allowed only as 0"
                    .into()
            }
            ("ip_local_reserved_ports", _) => {
                "the ports the kernel never picks by itself, which hold the daemon's \
                 listener ports"
                    .into()
            }
            ("route_localnet", _) => {
                "loopback addresses routed off the loopback device, allowed only as 0".into()
            }
            ("loopback-off-link", _) => {
                "a loopback destination, leaving by another device than loopback (a socket \
                 bound to a device)"
                    .into()
            }
            _ => "an option that routes packets".into(),
        }
    }
}

/// The name of a refused socket option.
pub(super) fn sockopt_name(level: u16, name: u16) -> &'static str {
    match (level, name) {
        (sockopt::SOL_IP, sockopt::IP_OPTIONS) => "IP_OPTIONS",
        (sockopt::SOL_IP, sockopt::IP_RETOPTS) => "IP_RETOPTS",
        (sockopt::SOL_IPV6, sockopt::IPV6_RTHDR) => "IPV6_RTHDR",
        (sockopt::SOL_IPV6, sockopt::IPV6_2292RTHDR) => "IPV6_2292RTHDR",
        (sockopt::SOL_IPV6, sockopt::IPV6_2292PKTOPTIONS) => "IPV6_2292PKTOPTIONS",
        (sockopt::SOL_IPV6, sockopt::IPV6_NEXTHOP) => "IPV6_NEXTHOP",
        (sockopt::SOL_IP, sockopt::IP_FREEBIND) => "IP_FREEBIND",
        (sockopt::SOL_IP, sockopt::IP_TRANSPARENT) => "IP_TRANSPARENT",
        (sockopt::SOL_IPV6, sockopt::IPV6_TRANSPARENT) => "IPV6_TRANSPARENT",
        (sockopt::SOL_IPV6, sockopt::IPV6_FREEBIND) => "IPV6_FREEBIND",
        (sockopt::SOL_IP, sockopt::IP_ADD_MEMBERSHIP) => "IP_ADD_MEMBERSHIP",
        (sockopt::SOL_IP, sockopt::IP_DROP_MEMBERSHIP) => "IP_DROP_MEMBERSHIP",
        (sockopt::SOL_IP, sockopt::IP_UNBLOCK_SOURCE) => "IP_UNBLOCK_SOURCE",
        (sockopt::SOL_IP, sockopt::IP_BLOCK_SOURCE) => "IP_BLOCK_SOURCE",
        (sockopt::SOL_IP, sockopt::IP_ADD_SOURCE_MEMBERSHIP) => "IP_ADD_SOURCE_MEMBERSHIP",
        (sockopt::SOL_IP, sockopt::IP_DROP_SOURCE_MEMBERSHIP) => "IP_DROP_SOURCE_MEMBERSHIP",
        (sockopt::SOL_IP, sockopt::IP_MSFILTER) => "IP_MSFILTER",
        (sockopt::SOL_IPV6, sockopt::IPV6_ADD_MEMBERSHIP) => "IPV6_ADD_MEMBERSHIP",
        (sockopt::SOL_IPV6, sockopt::IPV6_DROP_MEMBERSHIP) => "IPV6_DROP_MEMBERSHIP",
        (sockopt::SOL_IPV6, sockopt::IPV6_JOIN_ANYCAST) => "IPV6_JOIN_ANYCAST",
        (sockopt::SOL_IPV6, sockopt::IPV6_LEAVE_ANYCAST) => "IPV6_LEAVE_ANYCAST",
        (sockopt::SOL_IPV6, sockopt::IPV6_FLOWLABEL_MGR) => "IPV6_FLOWLABEL_MGR",
        (_, sockopt::MCAST_JOIN_GROUP) => "MCAST_JOIN_GROUP",
        (_, sockopt::MCAST_BLOCK_SOURCE) => "MCAST_BLOCK_SOURCE",
        (_, sockopt::MCAST_UNBLOCK_SOURCE) => "MCAST_UNBLOCK_SOURCE",
        (_, sockopt::MCAST_LEAVE_GROUP) => "MCAST_LEAVE_GROUP",
        (_, sockopt::MCAST_JOIN_SOURCE_GROUP) => "MCAST_JOIN_SOURCE_GROUP",
        (_, sockopt::MCAST_LEAVE_SOURCE_GROUP) => "MCAST_LEAVE_SOURCE_GROUP",
        (_, sockopt::MCAST_MSFILTER) => "MCAST_MSFILTER",
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
    /// `egress.lost.sandboxes`: of `count`, how many were each sandbox's (by the event's
    /// sandbox; `index N` for one no longer attached, `none` for no sandbox).
    pub sandboxes: Vec<LostBySandbox>,
}

/// One sandbox's part of an `events-lost` record.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct LostBySandbox {
    pub name: String,
    pub count: u64,
}

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

    /// `egress.verdict`'s text.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Allow => "allow",
            Self::Deny => "deny",
            Self::Audit => "audit",
            Self::Redirect => "redirect",
        }
    }

    /// `event.outcome`: whether the connection went ahead.
    pub(super) fn outcome(self) -> Outcome {
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
    /// A bind to the port of one of the daemon's listeners refused.
    Bind4,
    Bind6,
    /// A write to a guarding network sysctl refused.
    Sysctl,
    /// Not a kernel hook: a connection opened under a sandbox's earlier policy, which its
    /// new policy refuses, closed by the daemon when the policy was replaced.
    #[serde(rename = "policy_change")]
    PolicyChange,
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
            hook::BIND4 => Some(Self::Bind4),
            hook::BIND6 => Some(Self::Bind6),
            hook::SYSCTL => Some(Self::Sysctl),
            _ => None,
        }
    }

    /// The socket family a hook implies, for hooks that run for one family only.
    pub fn family(self) -> Option<SocketFamily> {
        match self {
            Self::Connect4 | Self::Sendmsg4 | Self::SockCreate4 | Self::Bind4 => {
                Some(SocketFamily::Inet)
            }
            Self::Connect6 | Self::Sendmsg6 | Self::SockCreate6 | Self::Bind6 => {
                Some(SocketFamily::Inet6)
            }
            Self::Setsockopt
            | Self::SkbEgress
            | Self::LsmSocketCreate
            | Self::Sysctl
            | Self::PolicyChange => None,
        }
    }

    /// Whether records of this hook carry a destination (an option or a socket being
    /// created has none yet).
    pub fn has_destination(self) -> bool {
        !matches!(
            self,
            Self::Setsockopt | Self::LsmSocketCreate | Self::Sysctl
        )
    }

    /// `event.action`.
    pub fn action(self) -> &'static str {
        match self {
            Self::Connect4 | Self::Connect6 => action::CONNECT,
            Self::Sendmsg4 | Self::Sendmsg6 => action::SENDMSG,
            Self::SockCreate4 | Self::SockCreate6 | Self::LsmSocketCreate => action::SOCKET,
            Self::Setsockopt => action::SETSOCKOPT,
            Self::SkbEgress => action::PACKET,
            Self::Bind4 | Self::Bind6 => action::BIND,
            Self::Sysctl => action::SYSCTL,
            Self::PolicyChange => action::CONNECTION_CUT,
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
            Self::Bind4 => "bind4",
            Self::Bind6 => "bind6",
            Self::Sysctl => "sysctl",
            Self::PolicyChange => "policy_change",
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
    pub(super) fn abi(self) -> u8 {
        match self {
            Self::Inet => 4,
            Self::Inet6 => 6,
            Self::Other(_) => 0,
        }
    }

    pub(super) fn from_abi(v: u8) -> Self {
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

/// ECS `network.transport`: the IANA keyword, for the protocols we can name; MPTCP
/// (the kernel's 262) is named too, since calling it TCP would hide it.
pub(super) fn transport_name(protocol: u32) -> Option<&'static str> {
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
