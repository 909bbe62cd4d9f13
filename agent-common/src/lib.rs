//! The kernel <-> userspace ABI: map keys and values, verdict and action codes, and the
//! events the eBPF programs write to the ring buffer.
//!
//! Everything here is `#[repr(C)]` with explicit padding and a size assertion, because the
//! same bytes are read by the verifier-checked kernel programs and by the daemon. The ABI
//! version is part of the bpffs pin directory name: a daemon never reuses maps pinned by a
//! build with a different layout.
#![no_std]

/// Bumped whenever any type in this crate changes layout or meaning, unless a daemon
/// reading what an older build's programs wrote is shown to fail closed (as `OrigDst`'s
/// `policy_slot`, which reads 0 there: such a redirect is refused). The older build's
/// links and maps stay pinned under their own directory until the new daemon has adopted
/// each sandbox with its own programs; then it removes them.
pub const ABI_VERSION: u32 = 3;

/// Sandbox indices run from 1 to `MAX_SANDBOXES - 1`; index 0 means "no sandbox found".
pub const MAX_SANDBOXES: u32 = 1024;
/// Compiled policies live in numbered slots so a replacement can be written beside the
/// old one and switched in with a single map update.
pub const MAX_POLICY_SLOTS: u32 = 2 * MAX_SANDBOXES;
/// Rules that can apply to one address prefix (including those inherited from shorter
/// prefixes that contain it).
pub const MAX_RULES_PER_PREFIX: usize = 16;
/// Distinct prefixes over all sandboxes, per address family.
pub const MAX_PREFIXES: u32 = 65536;
/// How many cgroup levels above the current one the programs search for a sandbox.
pub const MAX_CGROUP_DEPTH: u32 = 16;

/// What a rule (or a sandbox default) does with a matching destination.
pub mod action {
    pub const ALLOW: u8 = 1;
    pub const DENY: u8 = 2;
    /// Allow, but record the connection as one the policy would have denied.
    pub const AUDIT: u8 = 3;
    /// Rewritten to the credential-injecting proxy (reserved for the proxy).
    pub const PROXY: u8 = 4;
    /// Rewritten to the proxy, which relays TLS unchanged (reserved for the proxy).
    pub const PASSTHROUGH: u8 = 5;
}

/// The outcome a kernel program returned, as written into events.
pub mod verdict {
    pub const ALLOW: u8 = 1;
    pub const DENY: u8 = 2;
    /// Allowed only because the sandbox's default is `audit`.
    pub const AUDIT: u8 = 3;
    pub const REDIRECT: u8 = 4;
}

/// Which kernel hook made a decision.
pub mod hook {
    pub const CONNECT4: u8 = 1;
    pub const CONNECT6: u8 = 2;
    pub const SENDMSG4: u8 = 3;
    pub const SENDMSG6: u8 = 4;
    /// A socket refused at creation (raw, ICMP, or any protocol but TCP and UDP).
    pub const SOCK_CREATE4: u8 = 5;
    pub const SOCK_CREATE6: u8 = 6;
    /// `cgroup/setsockopt`: a socket option that would route packets elsewhere than the
    /// judged address (IPv4 options, IPv6 routing headers). `opt_level`/`opt_name` say which.
    pub const SETSOCKOPT: u8 = 7;
    /// `cgroup_skb/egress`: a packet leaving with IPv4 options or an IPv6 routing header
    /// (set through per-message control data, or any way the option hook did not see).
    pub const SKB_EGRESS: u8 = 8;
    /// BPF LSM `socket_create`: a socket family other than unix, inet, inet6 and netlink.
    pub const LSM_SOCKET_CREATE: u8 = 9;
    /// `cgroup/bind4|6`: a bind to a port of the daemon's own listeners in the sandbox's
    /// network namespace (the proxy, the DNS resolvers), which would take their traffic
    /// while they are not bound (a daemon restart).
    pub const BIND4: u8 = 10;
    pub const BIND6: u8 = 11;
    /// `cgroup/sysctl`: a write to a network sysctl of the sandbox's namespace that would
    /// undo a guarantee (`opt_name` is one of [`super::sysctl`]'s codes). A process that
    /// is root in the namespace's owning user namespace may write its `/proc/sys/net`
    /// without any capability.
    pub const SYSCTL: u8 = 12;
}

/// `ConnectEvent::opt_name` of a refused sysctl write ([`hook::SYSCTL`]).
pub mod sysctl {
    /// `net.ipv4.ip_nonlocal_bind` or `net.ipv6.ip_nonlocal_bind` set to anything but 0:
    /// binds to, and sends from (`IP_PKTINFO`), addresses that are not the host's.
    pub const NONLOCAL_BIND: u16 = 1;
    /// `net.ipv4.ip_local_reserved_ports` (IPv4 and IPv6): the daemon's listener ports
    /// the kernel must never pick for a socket that named no port.
    pub const RESERVED_PORTS: u16 = 2;
    /// `net.ipv4.conf.*.route_localnet` set to anything but 0: loopback addresses routed
    /// off the loopback device.
    pub const ROUTE_LOCALNET: u16 = 3;
}

/// `rule_id` of decisions that sent DNS to the sandbox's resolver (no policy rule).
pub const RULE_DNS: u16 = u16::MAX;

/// `rule_id` of refusals of a connect to the proxy's own port on loopback that the kernel
/// did not redirect there: only redirected connections may reach the proxy.
pub const RULE_PROXY_PORT: u16 = u16::MAX - 1;

/// `rule_id` of refusals of a call to the unspecified IPv4 address (`0.0.0.0`,
/// `::ffff:0.0.0.0`) that the kernel could deliver to a local address other than loopback:
/// it routes `0.0.0.0` to the call's source address, which a bound socket, a bound device
/// or a UDP send's control data chooses (an address the policy may refuse).
pub const RULE_UNSPECIFIED: u16 = u16::MAX - 2;

/// `rule_id` of refusals of a call the kernel would redirect to the daemon's loopback
/// listeners (the proxy, the resolver) from a socket bound to another device
/// (`SO_BINDTODEVICE`): what it sends would leave by that device, never reach them (and be
/// dropped at egress), while a redirected connection would wait in `BY_PEER` unanswered.
pub const RULE_BOUND_DEVICE: u16 = u16::MAX - 3;

/// Event kinds. A retired id is never reused.
pub mod event_kind {
    pub const CONNECT: u16 = 1;
}

/// Entries of `BY_PEER`: redirected connections between their SYN and the proxy's accept.
pub const MAX_REDIRECTS: u32 = 65536;

/// Where a redirected connection was going. Written by connect4/6 (on the socket), copied
/// by sock_ops to `BY_PEER` once the source port is known, read by the proxy.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct OrigDst {
    /// Original destination; IPv4 as `::ffff:a.b.c.d`.
    pub addr: [u8; 16],
    /// Host byte order.
    pub port: u16,
    /// The rule of `policy_slot` that redirected it.
    pub rule_id: u16,
    pub sandbox_index: u16,
    /// The policy slot in force when it was redirected: a rule id means something only in
    /// its slot's policy, and the proxy serves no connection redirected under a policy
    /// since replaced. (Where a build before it wrote a 32-bit index here, this reads 0,
    /// the slot of no policy, and such a connection is refused.)
    pub policy_slot: u16,
    /// Cookie of the sandbox's socket (joins the proxy's records to the connect record).
    pub socket_cookie: u64,
}
const _: () = assert!(core::mem::size_of::<OrigDst>() == 32);
// MAX_SANDBOXES is smaller still.
const _: () = assert!(MAX_POLICY_SLOTS <= u16::MAX as u32);

/// `BY_PEER` key: the sandbox socket's own address as the proxy sees it as its peer.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PeerKey {
    pub netns_cookie: u64,
    /// IPv4 as `::ffff:a.b.c.d`.
    pub addr: [u8; 16],
    /// Host byte order.
    pub port: u16,
    pub _pad: [u8; 6],
}
const _: () = assert!(core::mem::size_of::<PeerKey>() == 32);

/// IP protocol numbers as they appear in `bpf_sock_addr.protocol`; 0 in a rule means any.
pub mod proto {
    pub const ANY: u8 = 0;
    pub const TCP: u8 = 6;
    pub const UDP: u8 = 17;
}

/// Kernel constants the option, packet and socket-family checks use, named once for both
/// sides (userspace names them in records).
pub mod sockopt {
    pub const SOL_IP: u16 = 0;
    pub const SOL_IPV6: u16 = 41;
    /// IPv4 options on every packet of the socket (source routes among them).
    pub const IP_OPTIONS: u16 = 4;
    /// As a socket option only asks for options to be received; as control data it sets
    /// the options of one packet.
    pub const IP_RETOPTS: u16 = 7;
    pub const IPV6_2292RTHDR: u16 = 5;
    /// RFC 2292 sticky options given as control data, which may carry a routing header.
    pub const IPV6_2292PKTOPTIONS: u16 = 6;
    pub const IPV6_NEXTHOP: u16 = 9;
    pub const IPV6_RTHDR: u16 = 57;
    /// Bind to, or send from (`IP_PKTINFO`/`IPV6_PKTINFO`), an address that is not the
    /// host's: a forged source, whose answers (ICMP errors quoting the packet, echoing
    /// servers) go to that address. `IP_TRANSPARENT` needs `CAP_NET_RAW`; the freebind
    /// options need nothing.
    pub const IP_FREEBIND: u16 = 15;
    pub const IP_TRANSPARENT: u16 = 19;
    pub const IPV6_TRANSPARENT: u16 = 75;
    pub const IPV6_FREEBIND: u16 = 78;
    /// Multicast memberships and source filters (IPv4 35-41 and the protocol-independent
    /// `MCAST_*` 42-48, at both levels; IPv6 20-21 and anycast 27-28): the kernel announces
    /// each change itself in an IGMP or MLD report that names the groups and sources the
    /// caller chose, a packet no connect or send hook (nor `cgroup_skb`: it has no socket)
    /// sees.
    pub const IP_ADD_MEMBERSHIP: u16 = 35;
    pub const IP_DROP_MEMBERSHIP: u16 = 36;
    pub const IP_UNBLOCK_SOURCE: u16 = 37;
    pub const IP_BLOCK_SOURCE: u16 = 38;
    pub const IP_ADD_SOURCE_MEMBERSHIP: u16 = 39;
    pub const IP_DROP_SOURCE_MEMBERSHIP: u16 = 40;
    pub const IP_MSFILTER: u16 = 41;
    pub const MCAST_JOIN_GROUP: u16 = 42;
    pub const MCAST_BLOCK_SOURCE: u16 = 43;
    pub const MCAST_UNBLOCK_SOURCE: u16 = 44;
    pub const MCAST_LEAVE_GROUP: u16 = 45;
    pub const MCAST_JOIN_SOURCE_GROUP: u16 = 46;
    pub const MCAST_LEAVE_SOURCE_GROUP: u16 = 47;
    pub const MCAST_MSFILTER: u16 = 48;
    pub const IPV6_ADD_MEMBERSHIP: u16 = 20;
    pub const IPV6_DROP_MEMBERSHIP: u16 = 21;
    pub const IPV6_JOIN_ANYCAST: u16 = 27;
    pub const IPV6_LEAVE_ANYCAST: u16 = 28;
    /// A flow label request longer than `struct in6_flowlabel_req` (32 bytes): the kernel
    /// reads the rest as control data, which may carry a routing header.
    pub const IPV6_FLOWLABEL_MGR: u16 = 32;
    pub const FLOWLABEL_REQ_LEN: u16 = 32;
    /// `IPPROTO_ROUTING`: the IPv6 routing extension header.
    pub const IPPROTO_ROUTING: u16 = 43;
    /// IPv4 option types (first byte of an option, copy flag included).
    pub const IPOPT_LSRR: u16 = 131;
    pub const IPOPT_SSRR: u16 = 137;
    /// Not an option: `ConnectEvent::opt_level` of a packet the `skb_egress` program
    /// dropped because its sandbox is quarantined.
    pub const QUARANTINED: u16 = u16::MAX;
    /// Not an option: `ConnectEvent::opt_level` of a packet to a loopback address that the
    /// `skb_egress` program dropped because it was leaving by another device (a socket
    /// bound to a device sends it to the next hop as it is).
    pub const LOOPBACK_OFF_LINK: u16 = u16::MAX - 1;
}

/// The policy slot that holds no rules: a sandbox whose entry names it is denied
/// everything (quarantined, or its policy could not be restored), and the `skb_egress`
/// program drops its packets to anywhere but loopback (connections and connected UDP
/// sockets opened before, which no connect or sendmsg hook sees again).
pub const QUARANTINE_SLOT: u32 = 0;

/// Socket families (`AF_*`) a sandbox may create; every other one is refused by the BPF
/// LSM `socket_create` program.
pub mod family {
    pub const AF_UNIX: u16 = 1;
    pub const AF_INET: u16 = 2;
    pub const AF_INET6: u16 = 10;
    pub const AF_NETLINK: u16 = 16;
    pub const AF_PACKET: u16 = 17;
}

/// `SANDBOXES` value: one per attached cgroup, keyed by cgroup id (the directory's inode).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SandboxInfo {
    /// Stable index for counters and events.
    pub index: u32,
    /// Slot whose rules are in force.
    pub policy_slot: u32,
    /// `action::DENY` or `action::AUDIT`: what happens when no rule matches.
    pub default_action: u8,
    pub _pad: u8,
    /// Port of the proxy listener on the loopback of the sandbox's network namespace, host
    /// order; 0 = no proxy, and `proxy`/`passthrough` rules deny.
    pub proxy_port: u16,
    /// Port of the sandbox's DNS resolver on the same loopback, host order; 0 = none, and
    /// port 53 is decided by the rules like any other port.
    pub dns_port: u16,
    /// First port of the daemon's DNS resolvers, host order (each sandbox's is
    /// `dns_base + index`): binds to `dns_base..dns_base + MAX_SANDBOXES` are refused; 0 =
    /// none.
    pub dns_base: u16,
}
const _: () = assert!(core::mem::size_of::<SandboxInfo>() == 16);

/// One rule as the kernel sees it, after the address part has been matched.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RuleEntry {
    /// Inclusive port range, host byte order. 0..=65535 means any port.
    pub port_lo: u16,
    pub port_hi: u16,
    /// 1-based position of the rule in its policy; 0 is "the sandbox default".
    pub rule_id: u16,
    /// `proto::*`.
    pub protocol: u8,
    /// `action::*`.
    pub action: u8,
}
const _: () = assert!(core::mem::size_of::<RuleEntry>() == 8);

/// LPM trie value: the rules that can apply to addresses under one prefix, in the order
/// they are tried (longest prefix first, then policy order). The first whose port and
/// protocol match decides.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PrefixRules {
    pub count: u32,
    pub _pad: u32,
    pub entries: [RuleEntry; MAX_RULES_PER_PREFIX],
}
const _: () = assert!(core::mem::size_of::<PrefixRules>() == 8 + 8 * MAX_RULES_PER_PREFIX);

/// LPM trie key data for IPv4: the policy slot (always matched in full) then the address.
/// Prefix length = 32 + CIDR length.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct V4Key {
    /// Big-endian so the trie compares it byte by byte as a whole.
    pub slot_be: u32,
    pub addr: [u8; 4],
}
const _: () = assert!(core::mem::size_of::<V4Key>() == 8);

/// LPM trie key data for IPv6. Prefix length = 32 + CIDR length.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct V6Key {
    pub slot_be: u32,
    pub addr: [u8; 16],
}
const _: () = assert!(core::mem::size_of::<V6Key>() == 20);

/// Per-sandbox decision counters (a per-CPU array indexed by sandbox index).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SandboxCounters {
    pub allowed: u64,
    pub denied: u64,
    pub audited: u64,
    pub redirected: u64,
}
const _: () = assert!(core::mem::size_of::<SandboxCounters>() == 32);

/// Common header of every ring-buffer event.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EventHeader {
    /// `ABI_VERSION` of the program that wrote it.
    pub version: u16,
    /// `event_kind::*`.
    pub kind: u16,
    pub _pad: u32,
}
const _: () = assert!(core::mem::size_of::<EventHeader>() == 8);

/// A decision taken by connect4/6 or sendmsg4/6.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ConnectEvent {
    pub header: EventHeader,
    /// `bpf_ktime_get_ns` (CLOCK_MONOTONIC).
    pub ts_ns: u64,
    pub cgroup_id: u64,
    pub socket_cookie: u64,
    pub netns_cookie: u64,
    /// Thread-group id (the process id userspace sees).
    pub pid: u32,
    pub uid: u32,
    pub gid: u32,
    /// 0 when the cgroup was below an attached one but no sandbox was found.
    pub sandbox_index: u32,
    /// 1-based rule position, 0 for the default.
    pub rule_id: u16,
    /// Destination port, host byte order.
    pub dst_port: u16,
    /// 4 or 6: the socket's address family (for `hook::LSM_SOCKET_CREATE`: 0, and the
    /// kernel's `AF_*` number is in `opt_level`).
    pub family: u8,
    /// `verdict::*`.
    pub verdict: u8,
    /// `hook::*`.
    pub hook: u8,
    pub _pad: u8,
    /// The socket's protocol as the kernel numbers it, full width (MPTCP is 262, which a
    /// byte would turn into TCP's 6; the kernel keeps it in 16 bits).
    pub protocol: u16,
    /// The policy slot the decision was taken in (`SandboxInfo::policy_slot`): `rule_id`
    /// is a position in that slot's policy, which a replaced policy's events, read after
    /// the replacement, must still be named by. 0 (the quarantine slot) where no policy
    /// rule decided.
    pub policy_slot: u16,
    /// What was refused, by hook:
    /// - `SETSOCKOPT`: the option's level (0 = `SOL_IP`, 41 = `SOL_IPV6`);
    /// - `SKB_EGRESS`: 0 for IPv4 options, 43 (`IPPROTO_ROUTING`) for an IPv6 routing header;
    /// - `LSM_SOCKET_CREATE`: the address family (`AF_PACKET` = 17, ...).
    pub opt_level: u16,
    /// - `SETSOCKOPT`: the option name (`IP_OPTIONS` = 4, `IPV6_RTHDR` = 57, ...);
    /// - `SKB_EGRESS`: the first IPv4 option type (131 = LSRR, 137 = SSRR, ...) or the IPv6
    ///   routing type (0, 2, 3, 4 = segment routing);
    /// - `LSM_SOCKET_CREATE`: the socket type (`SOCK_RAW` = 3, ...).
    pub opt_name: u16,
    pub comm: [u8; 16],
    /// Destination address: 4 bytes for family 4, 16 for family 6 (network order). For
    /// `SKB_EGRESS` the address in the packet's IP header, which is the first hop a source
    /// route names, not the address connect/sendmsg judged.
    pub addr: [u8; 16],
}
const _: () = assert!(core::mem::size_of::<ConnectEvent>() == 104);

#[cfg(feature = "user")]
mod pod {
    use super::*;
    // SAFETY: all types are repr(C), Copy, contain only integers and have explicit padding.
    unsafe impl aya::Pod for SandboxInfo {}
    unsafe impl aya::Pod for RuleEntry {}
    unsafe impl aya::Pod for PrefixRules {}
    unsafe impl aya::Pod for V4Key {}
    unsafe impl aya::Pod for V6Key {}
    unsafe impl aya::Pod for SandboxCounters {}
    unsafe impl aya::Pod for ConnectEvent {}
    unsafe impl aya::Pod for OrigDst {}
    unsafe impl aya::Pod for PeerKey {}
}
