//! The decision shared by every hook: find the sandbox, match the destination against its
//! rules, count, and report.
use agent_common::{
    action, event_kind, hook, proto, verdict, ConnectEvent, EventHeader, OrigDst, PeerKey,
    PrefixRules, SandboxInfo, V4Key, V6Key, ABI_VERSION, MAX_CGROUP_DEPTH, MAX_RULES_PER_PREFIX,
    MAX_SANDBOXES, RULE_BOUND_DEVICE, RULE_DNS, RULE_PROXY_PORT, RULE_UNSPECIFIED,
};
use aya_ebpf::{
    bindings::{BPF_RB_AVAIL_DATA, BPF_RB_FORCE_WAKEUP, BPF_RB_NO_WAKEUP},
    helpers::{
        bpf_get_current_comm, bpf_get_current_pid_tgid, bpf_get_current_uid_gid,
        generated::{
            bpf_get_current_ancestor_cgroup_id, bpf_get_current_cgroup_id, bpf_get_netns_cookie,
            bpf_get_socket_cookie, bpf_ktime_get_ns,
        },
    },
    maps::lpm_trie::Key,
    programs::SockAddrContext,
    EbpfContext,
};

use crate::maps::{
    BY_PEER, COUNTERS, EVENTS, LOST, LOST_BY_SANDBOX, LOST_DENIED_BY_SANDBOX, RULES_V4, RULES_V6,
    SANDBOXES, SOCK_STATE,
};

/// Return value of a cgroup_sock_addr program: 1 lets the call proceed, 0 fails it with EPERM.
pub const RET_ALLOW: i32 = 1;
pub const RET_DENY: i32 = 0;

/// A destination as the programs see it. IPv4-mapped IPv6 destinations are carried as
/// their IPv4 address so both families apply the IPv4 policy.
pub enum Dest {
    V4([u8; 4]),
    V6([u8; 16]),
}

/// What the hook knows about the call being decided.
pub struct Call {
    pub hook: u8,
    /// 4 or 6: the socket's family.
    pub family: u8,
    /// Full width: MPTCP (262) must not read as TCP (6).
    pub protocol: u32,
    pub dest: Dest,
    /// Host byte order.
    pub port: u16,
    /// Raw address bytes for the event (as the caller passed them).
    pub raw_addr: [u8; 16],
    /// `ConnectEvent::opt_level` / `opt_name`: what was refused (0 for connect decisions).
    pub opt_level: u16,
    pub opt_name: u16,
}

/// Who an event is about. Each program type has its own helpers (a packet has no current
/// task it can trust, a socket being created no cookie yet), so each fills this itself.
pub struct Origin {
    pub cgroup_id: u64,
    pub socket_cookie: u64,
    pub netns_cookie: u64,
    pub pid: u32,
    pub uid: u32,
    pub gid: u32,
    pub comm: [u8; 16],
}

impl Origin {
    /// The current task, with the socket's cookies from a context whose program type has
    /// `bpf_get_socket_cookie` and `bpf_get_netns_cookie` (cgroup_sock_addr, cgroup_sock).
    #[inline(always)]
    pub fn task_and_socket(ctx: *mut core::ffi::c_void) -> Self {
        // SAFETY: helpers valid in cgroup_sock_addr and cgroup_sock programs.
        let (socket_cookie, netns_cookie) =
            unsafe { (bpf_get_socket_cookie(ctx), bpf_get_netns_cookie(ctx)) };
        Self {
            socket_cookie,
            netns_cookie,
            ..Self::task()
        }
    }

    /// The current task only (LSM, cgroup_sockopt).
    #[inline(always)]
    pub fn task() -> Self {
        let pid_tgid = bpf_get_current_pid_tgid();
        let uid_gid = bpf_get_current_uid_gid();
        Self {
            // SAFETY: helper without arguments.
            cgroup_id: unsafe { bpf_get_current_cgroup_id() },
            socket_cookie: 0,
            netns_cookie: 0,
            pid: (pid_tgid >> 32) as u32,
            uid: uid_gid as u32,
            gid: (uid_gid >> 32) as u32,
            comm: bpf_get_current_comm().unwrap_or([0u8; 16]),
        }
    }
}

/// Reads the protocol with a full 4-byte load; the verifier refuses narrower loads.
#[inline(always)]
pub fn protocol(ctx: &SockAddrContext) -> u32 {
    // SAFETY: `sock_addr` is the context pointer the kernel passed to the program.
    unsafe { core::ptr::read_volatile(&(*ctx.sock_addr).protocol) }
}

/// The port the caller asked for, in host byte order. `user_port` holds the port in network
/// order in its low 16 bits.
#[inline(always)]
pub fn port(ctx: &SockAddrContext) -> u16 {
    // SAFETY: context pointer from the kernel.
    let raw = unsafe { core::ptr::read_volatile(&(*ctx.sock_addr).user_port) };
    u16::from_be(raw as u16)
}

/// Whether a sendmsg4/6 call with destination port `port` is a send on a connected
/// socket that gave no address. The kernel refuses port 0 in an address before the hook,
/// so port 0 here means none was given: a connected UDP socket's send carrying control
/// data (`IP_TOS`, `IPV6_TCLASS`, ...) or `MSG_DONTROUTE`, which the kernel passes through
/// the hook with an empty address. It goes to the peer that connect4/6 judged (and may
/// have redirected), as every send on that socket without control data does without
/// calling the hook at all.
#[inline(always)]
pub fn sends_to_connected_peer(port: u16) -> bool {
    port == 0
}

/// Whether a sendmsg4 call to `addr`:`port` is a send on a dual-stack (AF_INET6) UDP
/// socket to the IPv4-mapped peer it is connected to. The kernel sends those through the
/// IPv4 path with the peer's address (`udpv6_sendmsg`), so the hook runs on every such
/// send; the peer is the one connect6 judged (and may have redirected to the sandbox's
/// resolver, whose port the hook would otherwise refuse).
#[inline(always)]
pub fn sends_to_mapped_peer(ctx: &SockAddrContext, addr: [u8; 4], port: u16) -> bool {
    const AF_INET6: u32 = 10;
    const TCP_ESTABLISHED: u32 = 1;
    // SAFETY: context pointer from the kernel; `sk` is the sending socket.
    let sk = unsafe { (*ctx.sock_addr).__bindgen_anon_1.sk };
    if sk.is_null() {
        return false;
    }
    // SAFETY: a socket pointer the verifier checked; constant offsets only.
    let (family, state, peer_port, w0, w1, w2, w3) = unsafe {
        (
            core::ptr::read_volatile(&(*sk).family),
            core::ptr::read_volatile(&(*sk).state),
            core::ptr::read_volatile(&(*sk).dst_port),
            core::ptr::read_volatile(&(*sk).dst_ip6[0]),
            core::ptr::read_volatile(&(*sk).dst_ip6[1]),
            core::ptr::read_volatile(&(*sk).dst_ip6[2]),
            core::ptr::read_volatile(&(*sk).dst_ip6[3]),
        )
    };
    family == AF_INET6
        && state == TCP_ESTABLISHED
        && w0 == 0
        && w1 == 0
        && w2 == u32::from_ne_bytes([0, 0, 0xff, 0xff])
        && w3 == u32::from_ne_bytes(addr)
        && u16::from_be(peer_port) == port
}

/// IPv4 destination bytes in network order.
#[inline(always)]
pub fn ipv4(ctx: &SockAddrContext) -> [u8; 4] {
    // SAFETY: context pointer from the kernel; `user_ip4` is stored in network order.
    let raw = unsafe { core::ptr::read_volatile(&(*ctx.sock_addr).user_ip4) };
    raw.to_ne_bytes()
}

/// IPv6 destination bytes in network order.
#[inline(always)]
pub fn ipv6(ctx: &SockAddrContext) -> [u8; 16] {
    let mut out = [0u8; 16];
    let mut i = 0;
    while i < 4 {
        // SAFETY: context pointer from the kernel; each word is in network order.
        let w = unsafe { core::ptr::read_volatile(&(*ctx.sock_addr).user_ip6[i]) };
        let b = w.to_ne_bytes();
        out[i * 4] = b[0];
        out[i * 4 + 1] = b[1];
        out[i * 4 + 2] = b[2];
        out[i * 4 + 3] = b[3];
        i += 1;
    }
    out
}

/// `a.b.c.d` as `::ffff:a.b.c.d`, the form the redirect maps store IPv4 in.
#[inline(always)]
pub fn mapped(v4: [u8; 4]) -> [u8; 16] {
    [
        0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, v4[0], v4[1], v4[2], v4[3],
    ]
}

/// The first 96 bits of IPv4-mapped addresses (`::ffff:a.b.c.d`).
const MAPPED_PREFIX: [u8; 12] = [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff];

/// The NAT64 well-known prefix (`64:ff9b::/96`, RFC 6052).
const NAT64_PREFIX: [u8; 12] = [0, 0x64, 0xff, 0x9b, 0, 0, 0, 0, 0, 0, 0, 0];

/// Whether `a` starts with the 96-bit `prefix` (its last 32 bits then carry an IPv4
/// address).
#[inline(always)]
fn in_prefix96(a: &[u8; 16], prefix: &[u8; 12]) -> bool {
    let mut i = 0;
    while i < 12 {
        if a[i] != prefix[i] {
            return false;
        }
        i += 1;
    }
    true
}

/// Whether an IPv6 address is IPv4-mapped (`::ffff:a.b.c.d`).
#[inline(always)]
pub fn is_mapped(a: &[u8; 16]) -> bool {
    in_prefix96(a, &MAPPED_PREFIX)
}

/// Where the kernel takes a call to `dest`: Linux connects and sends to `::` as to
/// loopback, so it is judged as `::1` (a policy denying loopback must not be passed by
/// spelling it `::`). The unspecified IPv4 address (`0.0.0.0`, `::ffff:0.0.0.0`) goes to
/// the call's source address, loopback only when nothing chose one: judged as `127.0.0.1`
/// for a TCP connect from a socket bound to no address and no device (`tcp_v4_connect`
/// routes by those alone), and left as it is otherwise (a UDP call, whose source a send's
/// `IP_PKTINFO` or the socket's `IP_UNICAST_IF` may choose unseen here), which
/// [`decide`] refuses.
#[inline(always)]
pub fn routed(ctx: &SockAddrContext, dest: Dest, protocol: u32) -> Dest {
    match dest {
        Dest::V4([0, 0, 0, 0]) if protocol == u32::from(proto::TCP) && unbound(ctx) => {
            Dest::V4([127, 0, 0, 1])
        }
        Dest::V6(a) if a == [0u8; 16] => {
            let mut loopback = [0u8; 16];
            loopback[15] = 1;
            Dest::V6(loopback)
        }
        other => other,
    }
}

/// [`routed`] for an IPv6 address as the caller gave it: mapped and NAT64 addresses are
/// judged as the IPv4 address they carry ([`v6_dest`]), but a NAT64 one goes to the
/// translator, never to loopback (its `0.0.0.0` is left unspecified, and refused).
#[inline(always)]
pub fn routed6(ctx: &SockAddrContext, addr: [u8; 16], protocol: u32) -> Dest {
    if is_nat64(&addr) {
        v6_dest(addr)
    } else {
        routed(ctx, v6_dest(addr), protocol)
    }
}

/// Whether the socket making the call has no IPv4 source address and no bound device.
#[inline(always)]
fn unbound(ctx: &SockAddrContext) -> bool {
    // SAFETY: context pointer from the kernel; `sk` is the socket making the call.
    let sk = unsafe { (*ctx.sock_addr).__bindgen_anon_1.sk };
    if sk.is_null() {
        return false;
    }
    // SAFETY: a socket pointer the verifier checked; constant offsets only.
    let (src, dev) = unsafe {
        (
            core::ptr::read_volatile(&(*sk).src_ip4),
            core::ptr::read_volatile(&(*sk).bound_dev_if),
        )
    };
    src == 0 && dev == 0
}

/// The loopback device's index, the same in every network namespace.
pub const LOOPBACK_IFINDEX: u32 = 1;

/// Whether the socket making the call is bound to a device other than loopback
/// (`SO_BINDTODEVICE`, unprivileged since Linux 5.7): a call redirected to the daemon's
/// loopback listeners would leave by that device, never reach them.
#[inline(always)]
fn bound_off_loopback(ctx: &SockAddrContext) -> bool {
    // SAFETY: context pointer from the kernel; `sk` is the socket making the call.
    let sk = unsafe { (*ctx.sock_addr).__bindgen_anon_1.sk };
    if sk.is_null() {
        return false;
    }
    // SAFETY: a socket pointer the verifier checked; a constant offset.
    let dev = unsafe { core::ptr::read_volatile(&(*sk).bound_dev_if) };
    dev != 0 && dev != LOOPBACK_IFINDEX
}

/// Where the kernel takes an IPv6 `connect()` to `::`: to `::ffff:127.0.0.1` for a socket
/// bound to an IPv4-mapped address (`tcp_v6_connect`, `__ip6_datagram_connect`), to `::1`
/// otherwise. Judged as that, so a policy whose IPv4 and IPv6 loopback rules differ is not
/// passed by spelling `127.0.0.1` as `::`.
#[inline(always)]
pub fn unspecified_v6_target(ctx: &SockAddrContext) -> Dest {
    // SAFETY: context pointer from the kernel; `sk` is the socket being connected.
    let sk = unsafe { (*ctx.sock_addr).__bindgen_anon_1.sk };
    if !sk.is_null() {
        // SAFETY: a socket pointer the verifier checked; constant offsets only.
        let (w0, w1, w2) = unsafe {
            (
                core::ptr::read_volatile(&(*sk).src_ip6[0]),
                core::ptr::read_volatile(&(*sk).src_ip6[1]),
                core::ptr::read_volatile(&(*sk).src_ip6[2]),
            )
        };
        if w0 == 0 && w1 == 0 && w2 == u32::from_ne_bytes([0, 0, 0xff, 0xff]) {
            return Dest::V4([127, 0, 0, 1]);
        }
    }
    let mut loopback = [0u8; 16];
    loopback[15] = 1;
    Dest::V6(loopback)
}

/// Whether `dest` is a loopback address (`127.0.0.0/8`, `::1`), where the proxy listens.
#[inline(always)]
fn is_loopback(dest: &Dest) -> bool {
    match dest {
        Dest::V4(a) => a[0] == 127,
        Dest::V6(a) => {
            let mut i = 0;
            while i < 15 {
                if a[i] != 0 {
                    return false;
                }
                i += 1;
            }
            a[15] == 1
        }
    }
}

/// Whether an IPv6 address is in the NAT64 well-known prefix: a translator delivers it to
/// the IPv4 address in its last 32 bits.
#[inline(always)]
pub fn is_nat64(a: &[u8; 16]) -> bool {
    in_prefix96(a, &NAT64_PREFIX)
}

/// `::ffff:a.b.c.d` -> `a.b.c.d`. connect6/sendmsg6 see these for AF_INET6 sockets talking
/// to IPv4 hosts (connect4 never runs for them), so they must get the IPv4 policy. So do
/// NAT64 addresses (`64:ff9b::a.b.c.d`), which reach `a.b.c.d` through a translator: an
/// IPv4 `deny` rule must not be passed by writing its address that way.
#[inline(always)]
pub fn v6_dest(addr: [u8; 16]) -> Dest {
    if is_mapped(&addr) || is_nat64(&addr) {
        Dest::V4([addr[12], addr[13], addr[14], addr[15]])
    } else {
        Dest::V6(addr)
    }
}

/// The sandbox the current task belongs to: its own cgroup, or the deepest ancestor that is
/// a sandbox (programs attached to a cgroup also run for its descendants).
#[inline(always)]
pub fn find_sandbox() -> Option<&'static SandboxInfo> {
    // SAFETY: helper without arguments.
    let id = unsafe { bpf_get_current_cgroup_id() };
    // SAFETY: helper taking a plain integer.
    find_sandbox_from(id, |level| unsafe {
        bpf_get_current_ancestor_cgroup_id(level)
    })
}

/// The sandbox of cgroup `id`, or of its deepest ancestor that is one; `ancestor(level)`
/// gives the ancestor at depth `level` (0 = root), or 0 past the cgroup itself.
#[inline(always)]
pub fn find_sandbox_from(id: u64, ancestor: impl Fn(i32) -> u64) -> Option<&'static SandboxInfo> {
    // SAFETY: the value is only read.
    if let Some(s) = unsafe { SANDBOXES.get(id) } {
        return Some(s);
    }
    let mut found = None;
    let mut level = 1u32;
    while level <= MAX_CGROUP_DEPTH {
        let anc = ancestor(level as i32);
        if anc == 0 {
            break;
        }
        // SAFETY: the value is only read.
        if let Some(s) = unsafe { SANDBOXES.get(anc) } {
            found = Some(s);
        }
        level += 1;
    }
    found
}

/// The first rule under the longest matching prefix whose port and protocol match.
#[inline(always)]
fn match_rules(rules: &PrefixRules, port: u16, protocol: u32) -> Option<(u8, u16)> {
    let n = rules.count as usize;
    let mut i = 0;
    while i < MAX_RULES_PER_PREFIX {
        if i >= n {
            break;
        }
        let r = &rules.entries[i];
        if (r.protocol == proto::ANY || u32::from(r.protocol) == protocol)
            && port >= r.port_lo
            && port <= r.port_hi
        {
            return Some((r.action, r.rule_id));
        }
        i += 1;
    }
    None
}

#[inline(always)]
fn lookup(slot: u32, dest: &Dest) -> Option<&'static PrefixRules> {
    match dest {
        Dest::V4(addr) => {
            let key = Key::new(
                64,
                V4Key {
                    slot_be: slot.to_be(),
                    addr: *addr,
                },
            );
            RULES_V4.get(&key)
        }
        Dest::V6(addr) => {
            let key = Key::new(
                160,
                V6Key {
                    slot_be: slot.to_be(),
                    addr: *addr,
                },
            );
            RULES_V6.get(&key)
        }
    }
}

/// Decides one call. Returns the program's return value.
#[inline(always)]
pub fn decide(ctx: &SockAddrContext, call: &Call) -> i32 {
    let sandbox = find_sandbox();
    let (index, verdict, rule_id) = match sandbox {
        // Only reachable below an attached cgroup whose sandbox entry is gone: deny.
        None => (0, verdict::DENY, 0),
        // All DNS goes to the sandbox's resolver, whatever server was asked.
        Some(sb)
            if call.port == 53
                && sb.dns_port != 0
                && (call.protocol == u32::from(proto::UDP)
                    || call.protocol == u32::from(proto::TCP)) =>
        {
            if bound_off_loopback(ctx) {
                (sb.index, verdict::DENY, RULE_BOUND_DEVICE)
            } else if redirect(ctx, call, sb, RULE_DNS, sb.dns_port).is_ok() {
                (sb.index, verdict::REDIRECT, RULE_DNS)
            } else {
                (sb.index, verdict::DENY, RULE_DNS)
            }
        }
        // `0.0.0.0` that [`routed`] could not show reaches loopback: it goes to a source
        // address the call chose, which no rule was asked about.
        Some(sb) if matches!(call.dest, Dest::V4([0, 0, 0, 0])) => {
            (sb.index, verdict::DENY, RULE_UNSPECIFIED)
        }
        // The proxy serves only connections the kernel sent it (it learns their
        // destination from the redirect), and a sandbox sending to another's resolver
        // would spend its budget and use its names, in its name: a call made to their
        // ports directly is refused here, where it is recorded, whatever the policy says
        // of loopback.
        Some(sb)
            if is_loopback(&call.dest)
                && listener_rule(sb, call.port, Some(call.protocol)).is_some() =>
        {
            let rule = listener_rule(sb, call.port, Some(call.protocol)).unwrap_or(0);
            (sb.index, verdict::DENY, rule)
        }
        Some(sb) => {
            let matched = lookup(sb.policy_slot, &call.dest)
                .and_then(|rules| match_rules(rules, call.port, call.protocol));
            match matched {
                Some((action::ALLOW, id)) => (sb.index, verdict::ALLOW, id),
                Some((action::PROXY | action::PASSTHROUGH, _))
                    if call.protocol == u32::from(proto::TCP)
                        && sb.proxy_port != 0
                        && bound_off_loopback(ctx) =>
                {
                    (sb.index, verdict::DENY, RULE_BOUND_DEVICE)
                }
                Some((action::PROXY | action::PASSTHROUGH, id))
                    if call.protocol == u32::from(proto::TCP)
                        && sb.proxy_port != 0
                        && redirect(ctx, call, sb, id, sb.proxy_port).is_ok() =>
                {
                    (sb.index, verdict::REDIRECT, id)
                }
                // Deny, a redirect that cannot be made (no proxy, not TCP, map full), and
                // actions this build does not know.
                Some((_, id)) => (sb.index, verdict::DENY, id),
                None if sb.default_action == action::AUDIT => (sb.index, verdict::AUDIT, 0),
                None => (sb.index, verdict::DENY, 0),
            }
        }
    };
    count(index, verdict);
    report(
        &Origin::task_and_socket(ctx.as_ptr()),
        call,
        Decided {
            index,
            slot: sandbox.map_or(0, |sb| sb.policy_slot),
            verdict,
            rule_id,
        },
    );
    // A TCP socket connected again without a redirect (after `connect(AF_UNSPEC)`) must
    // not keep an earlier redirect's destination: sock_ops would hand it to the proxy
    // under the new connection's source address, where another socket (of this sandbox
    // or, in a shared namespace, another's) may be connecting to the proxy.
    if verdict != verdict::REDIRECT
        && call.protocol == u32::from(proto::TCP)
        && (call.hook == hook::CONNECT4 || call.hook == hook::CONNECT6)
    {
        forget_orig(socket(ctx));
    }
    if verdict == verdict::DENY {
        RET_DENY
    } else {
        RET_ALLOW
    }
}

/// The socket making the call: non-null in cgroup_sock_addr programs.
#[inline(always)]
pub fn socket(ctx: &SockAddrContext) -> *mut core::ffi::c_void {
    // SAFETY: context pointer from the kernel.
    unsafe { (*ctx.sock_addr).__bindgen_anon_1.sk }.cast()
}

/// Forgets the socket's original destination, if it has one.
#[inline(always)]
pub fn forget_orig(sk: *mut core::ffi::c_void) {
    if !sk.is_null() {
        let _ = SOCK_STATE.update(sk, |state| state.has_orig = 0);
    }
}

/// Removes `BY_PEER[key]` if it is still the entry of the socket whose program context is
/// `ctx` (a sock_ops or cgroup_sock context): the proxy may have taken it, and the key
/// been reused by another connection since.
#[inline(always)]
pub fn forget_own_peer(key: PeerKey, ctx: *mut core::ffi::c_void) {
    // SAFETY: helper valid in sock_ops and cgroup_sock programs.
    let cookie = unsafe { bpf_get_socket_cookie(ctx) };
    // SAFETY: only a field is read.
    let own = unsafe { BY_PEER.get(key) }.is_some_and(|o| o.socket_cookie == cookie);
    if own {
        let _ = BY_PEER.remove(key);
    }
}

/// Decides a bind: refused (and reported) when it names the port of one of the daemon's
/// listeners: the proxy's, or any sandbox's DNS resolver's. Other binds pass unrecorded.
#[inline(always)]
pub fn decide_bind(ctx: &SockAddrContext, call: &Call) -> i32 {
    let Some(sb) = find_sandbox() else {
        // Only below an attached cgroup whose sandbox entry is gone: nothing is judged
        // there but everything is refused.
        report(
            &Origin::task_and_socket(ctx.as_ptr()),
            call,
            Decided::refused(0, 0),
        );
        return RET_DENY;
    };
    let rule = listener_rule(sb, call.port, None);
    let Some(rule_id) = rule else {
        return RET_ALLOW;
    };
    count(sb.index, verdict::DENY);
    report(
        &Origin::task_and_socket(ctx.as_ptr()),
        call,
        Decided::refused(sb.index, rule_id),
    );
    RET_DENY
}

/// The rule id naming a port of the daemon's own listeners in the sandbox's namespace,
/// if `port` is one: the proxy's (TCP, or any `protocol` when `None`), or any sandbox's
/// resolver's.
#[inline(always)]
fn listener_rule(sb: &SandboxInfo, port: u16, protocol: Option<u32>) -> Option<u16> {
    let tcp = protocol.is_none_or(|p| p == u32::from(proto::TCP));
    if port == 0 {
        None
    } else if tcp && sb.proxy_port != 0 && port == sb.proxy_port {
        Some(RULE_PROXY_PORT)
    } else if sb.dns_base != 0
        && port >= sb.dns_base
        && u32::from(port - sb.dns_base) < MAX_SANDBOXES
    {
        Some(RULE_DNS)
    } else {
        None
    }
}

/// Rewrites the destination to the proxy listener on the loopback of the caller's network
/// namespace and remembers the original one on the socket. The rewrite happens
/// before the kernel routes the connect, so nothing is sent to the original destination.
#[inline(always)]
fn redirect(
    ctx: &SockAddrContext,
    call: &Call,
    sb: &SandboxInfo,
    rule_id: u16,
    to_port: u16,
) -> Result<(), i64> {
    // A NAT64 destination, judged by its IPv4 address, is still reached through the
    // translator: the proxy dials the address the client named, from IPv6 loopback.
    let nat64 = call.family == 6 && is_nat64(&call.raw_addr);
    let addr = match call.dest {
        Dest::V4(_) if nat64 => call.raw_addr,
        Dest::V4(a) => mapped(a),
        Dest::V6(a) => a,
    };
    // SAFETY: helper valid in cgroup_sock_addr programs.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let orig = OrigDst {
        addr,
        port: call.port,
        rule_id,
        // Both below MAX_SANDBOXES / MAX_POLICY_SLOTS, which fit (agent-common checks).
        sandbox_index: sb.index as u16,
        policy_slot: sb.policy_slot as u16,
        socket_cookie: cookie,
    };
    let sk = socket(ctx);
    if sk.is_null() {
        return Err(-1);
    }
    // Written only when it changes: an unconnected socket's sends to port 53 come here
    // for every datagram, and a reply read meanwhile must not see half of another.
    SOCK_STATE
        .update_or_create(sk, |state| {
            if state.has_orig == 0 || state.orig != orig {
                state.orig = orig;
                state.has_orig = 1;
            }
        })
        .ok_or(-1i64)?;
    let port = u32::from(to_port.to_be());
    let sa = ctx.sock_addr;
    // SAFETY: context pointer from the kernel; full 4-byte stores as the verifier requires.
    unsafe {
        if call.family == 4 {
            (*sa).user_ip4 = u32::from_ne_bytes([127, 0, 0, 1]);
        } else if matches!(call.dest, Dest::V4(_)) && !nat64 {
            // A dual-stack socket going to an IPv4 host: ::ffff:127.0.0.1.
            (*sa).user_ip6[0] = 0;
            (*sa).user_ip6[1] = 0;
            (*sa).user_ip6[2] = u32::from_ne_bytes([0, 0, 0xff, 0xff]);
            (*sa).user_ip6[3] = u32::from_ne_bytes([127, 0, 0, 1]);
        } else {
            (*sa).user_ip6[0] = 0;
            (*sa).user_ip6[1] = 0;
            (*sa).user_ip6[2] = 0;
            (*sa).user_ip6[3] = u32::from_ne_bytes([0, 0, 0, 1]);
        }
        (*sa).user_port = port;
    }
    Ok(())
}

/// Adds one to a per-CPU counter atomically: a cgroup program may be preempted (it runs
/// with migration, not preemption, disabled) or interrupted by a softirq whose skb
/// program counts on the same CPU, and a plain load-add-store would lose an increment.
#[inline(always)]
fn bump(counter: *mut u64) {
    // BPF's atomic add (`BPF_ATOMIC | BPF_ADD`, no fetch), which `AtomicU64::fetch_add`
    // does not offer on this target (it has no compare-and-swap).
    #[cfg(target_arch = "bpf")]
    // SAFETY: `counter` points into a map value, live and 8-byte aligned for the
    // program's run; the instruction reads and writes only those 8 bytes.
    unsafe {
        core::arch::asm!(
            "lock *(u64 *)({0} + 0) += {1}",
            in(reg) counter,
            in(reg) 1u64,
            options(nostack),
        );
    }
    #[cfg(not(target_arch = "bpf"))]
    let _ = counter;
}

#[inline(always)]
fn count(index: u32, v: u8) {
    if let Some(c) = COUNTERS.get_ptr_mut(index) {
        // SAFETY: a map value's fields, live for the program's run.
        let field = unsafe {
            match v {
                verdict::ALLOW => &raw mut (*c).allowed,
                verdict::AUDIT => &raw mut (*c).audited,
                verdict::REDIRECT => &raw mut (*c).redirected,
                _ => &raw mut (*c).denied,
            }
        };
        bump(field);
    }
}

/// What was decided, and in whose name.
pub struct Decided {
    /// The sandbox's index (0: none found).
    pub index: u32,
    /// The policy slot whose rule `rule_id` is; 0 where no policy rule decided.
    pub slot: u32,
    pub verdict: u8,
    /// A rule's 1-based position in the slot's policy, 0 for its default, or one of the
    /// `RULE_*` ids that name no policy rule.
    pub rule_id: u16,
}

impl Decided {
    /// A refusal by no policy rule (`rule_id` 0 or a `RULE_*` id).
    #[inline(always)]
    pub fn refused(index: u32, rule_id: u16) -> Self {
        Self {
            index,
            slot: 0,
            verdict: verdict::DENY,
            rule_id,
        }
    }
}

/// Writes one event; a full ring buffer is counted in `LOST`, never ignored.
#[inline(always)]
pub fn report(origin: &Origin, call: &Call, decided: Decided) {
    let Decided {
        index,
        slot,
        verdict: v,
        rule_id,
    } = decided;
    let Some(mut entry) = EVENTS.reserve::<ConnectEvent>(0) else {
        if let Some(lost) = LOST.get_ptr_mut(0) {
            bump(lost);
        }
        // (The helper checks the index.)
        if let Some(lost) = LOST_BY_SANDBOX.get_ptr_mut(index) {
            bump(lost);
        }
        if v == verdict::DENY {
            if let Some(lost) = LOST_DENIED_BY_SANDBOX.get_ptr_mut(index) {
                bump(lost);
            }
        }
        return;
    };
    let ev = ConnectEvent {
        header: EventHeader {
            version: ABI_VERSION as u16,
            kind: event_kind::CONNECT,
            _pad: 0,
        },
        // SAFETY: helper without arguments, valid in every program type used here.
        ts_ns: unsafe { bpf_ktime_get_ns() },
        cgroup_id: origin.cgroup_id,
        socket_cookie: origin.socket_cookie,
        netns_cookie: origin.netns_cookie,
        pid: origin.pid,
        uid: origin.uid,
        gid: origin.gid,
        sandbox_index: index,
        rule_id,
        dst_port: call.port,
        family: call.family,
        verdict: v,
        hook: call.hook,
        _pad: 0,
        // The kernel keeps a socket's protocol in 16 bits (the LSM hook, which sees the
        // number a caller asked for, saturates it first).
        protocol: call.protocol as u16,
        // Below MAX_POLICY_SLOTS, which fits (agent-common checks).
        policy_slot: slot as u16,
        opt_level: call.opt_level,
        opt_name: call.opt_name,
        comm: origin.comm,
        addr: call.raw_addr,
    };
    entry.write(ev);
    entry.submit(submit_flags());
}

/// Unread bytes in `EVENTS` at each multiple of which a submit wakes the reader at once.
/// Between them, events are submitted without a wake-up and the daemon picks them up on
/// its short poll (see `bpf::events`), so a burst costs one wake-up instead of one per
/// event. 64 KiB is about 550 events: a few milliseconds at the highest rates, far from
/// the 4 MiB the buffer holds.
const WAKEUP_THRESHOLD: u64 = 64 << 10;

/// What one event takes in `EVENTS`: its 8-byte record header and the event, rounded up
/// to 8 bytes (unread data is counted in these).
const ENTRY_BYTES: u64 = ((core::mem::size_of::<ConnectEvent>() + 8 + 7) & !7) as u64;

/// `BPF_RB_FORCE_WAKEUP` for the submit that takes unread data across a multiple of
/// [`WAKEUP_THRESHOLD`], `BPF_RB_NO_WAKEUP` otherwise: a reader that falls behind (or is
/// stopped) is woken once per 64 KiB, not once per event, which would cost each decision
/// a wake-up (about 12 µs here). Racing submits on other CPUs can hide a crossing; the
/// reader's poll still comes within its interval. Verdicts never depend on this.
#[inline(always)]
fn submit_flags() -> u64 {
    let unread = EVENTS.query(u64::from(BPF_RB_AVAIL_DATA));
    if unread / WAKEUP_THRESHOLD != unread.saturating_sub(ENTRY_BYTES) / WAKEUP_THRESHOLD {
        u64::from(BPF_RB_FORCE_WAKEUP)
    } else {
        u64::from(BPF_RB_NO_WAKEUP)
    }
}

/// For replies and peer names of sockets whose destination was rewritten: the address the
/// socket's owner asked for instead of our loopback listener, so stock resolvers (which
/// check where a reply came from) accept it. Returns whether it rewrote.
#[inline(always)]
pub fn restore_source(ctx: &SockAddrContext, family: u8) -> bool {
    let sk = socket(ctx);
    if sk.is_null() {
        return false;
    }
    let Some(orig) = SOCK_STATE
        .get(sk)
        .and_then(|state| (state.has_orig == 1).then_some(state.orig))
    else {
        return false;
    };
    let sa = ctx.sock_addr;
    // Only a reply from our loopback listener is rewritten.
    // SAFETY: context pointer from the kernel; full 4-byte loads.
    let from_loopback = unsafe {
        if family == 4 {
            core::ptr::read_volatile(&(*sa).user_ip4) == u32::from_ne_bytes([127, 0, 0, 1])
        } else {
            let w2 = core::ptr::read_volatile(&(*sa).user_ip6[2]);
            let w3 = core::ptr::read_volatile(&(*sa).user_ip6[3]);
            core::ptr::read_volatile(&(*sa).user_ip6[0]) == 0
                && core::ptr::read_volatile(&(*sa).user_ip6[1]) == 0
                && ((w2 == 0 && w3 == u32::from_ne_bytes([0, 0, 0, 1]))
                    || (w2 == u32::from_ne_bytes([0, 0, 0xff, 0xff])
                        && w3 == u32::from_ne_bytes([127, 0, 0, 1])))
        }
    };
    // ...and only from the port of the sandbox's resolver or proxy: another process on
    // the same loopback must not pass its datagrams off as the server's answer.
    let from_port = port(ctx);
    let ours = find_sandbox().is_some_and(|sb| {
        from_port != 0 && (from_port == sb.dns_port || from_port == sb.proxy_port)
    });
    if !from_loopback || !ours {
        return false;
    }
    let a = orig.addr;
    let mapped = is_mapped(&a);
    // SAFETY: context pointer from the kernel; full 4-byte stores.
    unsafe {
        if family == 4 {
            if !mapped {
                return false;
            }
            (*sa).user_ip4 = u32::from_ne_bytes([a[12], a[13], a[14], a[15]]);
        } else {
            (*sa).user_ip6[0] = u32::from_ne_bytes([a[0], a[1], a[2], a[3]]);
            (*sa).user_ip6[1] = u32::from_ne_bytes([a[4], a[5], a[6], a[7]]);
            (*sa).user_ip6[2] = u32::from_ne_bytes([a[8], a[9], a[10], a[11]]);
            (*sa).user_ip6[3] = u32::from_ne_bytes([a[12], a[13], a[14], a[15]]);
        }
        (*sa).user_port = u32::from(orig.port.to_be());
    }
    true
}

/// Refuses a socket a sandbox may not have (raw, ICMP, anything but TCP and UDP), which no
/// connect/sendmsg hook would ever judge. Counted and reported like a denied connect.
#[inline(always)]
pub fn deny_socket(ctx: *mut core::ffi::c_void, family: u8, protocol: u32) -> i32 {
    let index = find_sandbox().map_or(0, |sb| sb.index);
    let call = Call {
        hook: if family == 6 {
            agent_common::hook::SOCK_CREATE6
        } else {
            agent_common::hook::SOCK_CREATE4
        },
        family,
        protocol,
        dest: Dest::V4([0; 4]),
        port: 0,
        raw_addr: [0; 16],
        opt_level: 0,
        opt_name: 0,
    };
    count(index, verdict::DENY);
    report(
        &Origin::task_and_socket(ctx),
        &call,
        Decided::refused(index, 0),
    );
    RET_DENY
}

/// Counts a refusal against a sandbox (index 0 when none was found).
#[inline(always)]
pub fn count_deny(index: u32) {
    count(index, verdict::DENY);
}
