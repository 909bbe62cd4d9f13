//! `cgroup_skb/egress` on each sandbox cgroup: the last look at a packet before it leaves.
//! Source routes set per message (`IP_RETOPTS`, `IPV6_RTHDR` or `IPV6_2292RTHDR` control
//! data on sendmsg), which no socket-option hook sees, and anything set by a path the
//! setsockopt hook misses (compat syscalls), show up here: an IPv4 header with options
//! (IHL > 5) or an IPv6 extension-header chain holding a routing header (next header 43).
//! Such packets are dropped; the sender's sendmsg fails with EPERM. So is a packet to
//! a loopback address leaving by another device than loopback.
//!
//! Runs for every packet of the sandbox's sockets, so the common case is one byte load for
//! IPv4 and two for IPv6 without extension headers. A packet is attributed to the cgroup
//! of the socket that sent it (`bpf_skb_cgroup_id`), not to whatever task runs the stack.
use agent_common::{hook, sockopt, SandboxInfo, QUARANTINE_SLOT};
use aya_ebpf::{
    helpers::generated::{bpf_get_socket_cookie, bpf_skb_ancestor_cgroup_id, bpf_skb_cgroup_id},
    macros::cgroup_skb,
    programs::SkBuffContext,
    EbpfContext,
};

use crate::{
    decide::{
        count_deny, find_sandbox_from, report, Call, Decided, Dest, Origin, LOOPBACK_IFINDEX,
    },
    maps::DENY_ALL,
};

const AF_INET: u32 = 2;
const AF_INET6: u32 = 10;

/// cgroup_skb return values.
const PASS: i32 = 1;
const DROP: i32 = 0;

const NEXTHDR_HOP: u8 = 0;
const NEXTHDR_ROUTING: u8 = 43;
const NEXTHDR_FRAGMENT: u8 = 44;
const NEXTHDR_AUTH: u8 = 51;
const NEXTHDR_DEST: u8 = 60;
/// Extension headers walked before giving up (and dropping): the socket API can stack at
/// most four, so a longer chain is not something a sandbox's stack builds.
const MAX_EXT_HEADERS: u32 = 8;

const IPOPT_END: u8 = 0;
const IPOPT_NOOP: u8 = 1;

#[cgroup_skb(egress)]
pub fn egress_skb(ctx: SkBuffContext) -> i32 {
    // Any error reading the packet drops it: the wrapper holds the closed default.
    try_egress_skb(&ctx).unwrap_or(DROP)
}

#[inline(always)]
fn try_egress_skb(ctx: &SkBuffContext) -> Result<i32, i64> {
    // cgroup_skb programs see the packet from its network header.
    let b0: u8 = ctx.load(0)?;
    // A quarantined sandbox's connections and connected UDP sockets opened before (which
    // no connect or sendmsg hook sees again) send nothing more but to loopback, where its
    // resolver answers REFUSED.
    if DENY_ALL.get(0).is_some_and(|n| *n > 0) {
        if let Some(dropped) = quarantined(ctx, b0)? {
            return Ok(dropped);
        }
    }
    // A packet to a loopback address stays on the host only through the loopback device.
    // A socket bound to another device (`SO_BINDTODEVICE`, `IP_UNICAST_IF`, a per-message
    // `IP_PKTINFO` interface) sends it out that device as it is: to the next hop, with
    // whatever the sandbox wrote, judged (or redirected to the daemon's listeners) as a
    // loopback destination.
    // SAFETY: the context pointer is the kernel's `__sk_buff`, readable for its lifetime.
    if unsafe { (*ctx.skb.skb).ifindex } != LOOPBACK_IFINDEX {
        if let Some(dropped) = loopback_off_link(ctx, b0)? {
            return Ok(dropped);
        }
    }
    match b0 >> 4 {
        4 => {
            if b0 & 0x0f <= 5 {
                return Ok(PASS);
            }
            let kind = first_ipv4_option(ctx, usize::from(b0 & 0x0f) * 4);
            let mut addr = [0u8; 16];
            let daddr: [u8; 4] = ctx.load(16)?;
            addr[..4].copy_from_slice(&daddr);
            let protocol: u8 = ctx.load(9)?;
            Ok(drop(ctx, 4, u32::from(protocol), 0, kind, addr))
        }
        6 => {
            let mut nh: u8 = ctx.load(6)?;
            let mut off = 40usize;
            let mut i = 0u32;
            while i < MAX_EXT_HEADERS {
                match nh {
                    NEXTHDR_ROUTING => {
                        let rtype: u8 = ctx.load(off + 2)?;
                        let addr: [u8; 16] = ctx.load(24)?;
                        return Ok(drop(
                            ctx,
                            6,
                            0,
                            sockopt::IPPROTO_ROUTING,
                            u16::from(rtype),
                            addr,
                        ));
                    }
                    NEXTHDR_HOP | NEXTHDR_DEST => {
                        let next: u8 = ctx.load(off)?;
                        let len: u8 = ctx.load(off + 1)?;
                        off += (usize::from(len) + 1) * 8;
                        nh = next;
                    }
                    NEXTHDR_FRAGMENT => {
                        nh = ctx.load(off)?;
                        off += 8;
                    }
                    NEXTHDR_AUTH => {
                        let next: u8 = ctx.load(off)?;
                        let len: u8 = ctx.load(off + 1)?;
                        off += (usize::from(len) + 2) * 4;
                        nh = next;
                    }
                    _ => return Ok(PASS),
                }
                i += 1;
            }
            let addr: [u8; 16] = ctx.load(24)?;
            Ok(drop(ctx, 6, 0, sockopt::IPPROTO_ROUTING, u16::MAX, addr))
        }
        _ => Ok(PASS),
    }
}

/// The drop of a packet to a loopback address leaving by another device than loopback,
/// or `None` to go on.
#[inline(always)]
fn loopback_off_link(ctx: &SkBuffContext, b0: u8) -> Result<Option<i32>, i64> {
    match destination(ctx, b0)? {
        Some((family, addr, true)) => Ok(Some(drop_to(
            ctx,
            family,
            addr,
            sockopt::LOOPBACK_OFF_LINK,
        )?)),
        _ => Ok(None),
    }
}

/// The drop of a packet to anywhere but loopback from a sandbox that is denied
/// everything, or `None` to go on.
#[inline(always)]
fn quarantined(ctx: &SkBuffContext, b0: u8) -> Result<Option<i32>, i64> {
    let deny_all = packet_sandbox(ctx)
        .1
        .is_some_and(|sb| sb.policy_slot == QUARANTINE_SLOT);
    if !deny_all {
        return Ok(None);
    }
    match destination(ctx, b0)? {
        Some((family, addr, false)) => Ok(Some(drop_to(ctx, family, addr, sockopt::QUARANTINED)?)),
        // A loopback destination in the header may be the work of NAT in the sandbox's
        // namespace (a service mesh's `REDIRECT` to its local proxy, which sends the
        // stream on): netfilter's output hooks run before this one. The socket's own
        // peer, which NAT never rewrites, says where the sandbox sent it.
        Some((family, _, true)) => match socket_peer(ctx) {
            Some((peer_family, peer, false)) => Ok(Some(drop_to(
                ctx,
                family,
                if peer_family == family {
                    peer
                } else {
                    mapped(peer, peer_family)
                },
                sockopt::QUARANTINED,
            )?)),
            _ => Ok(None),
        },
        None => Ok(None),
    }
}

/// The peer of the socket that sent the packet, as `connect()` left it (IPv4 in the first
/// four bytes) and whether it is loopback; `None` for a socket with no peer (unconnected
/// UDP) or no socket.
#[inline(always)]
fn socket_peer(ctx: &SkBuffContext) -> Option<(u8, [u8; 16], bool)> {
    // SAFETY: the context pointer is the kernel's `__sk_buff`; `sk` is a socket pointer
    // the verifier checks for NULL below, and these fields are readable on any socket.
    let sk = unsafe { (*ctx.skb.skb).__bindgen_anon_2.sk };
    if sk.is_null() {
        return None;
    }
    let mut addr = [0u8; 16];
    // Each field read whole, volatile: the verifier allows only 4-byte loads of them, and
    // LLVM would otherwise merge neighbours into one wider load.
    match unsafe { core::ptr::read_volatile(&(*sk).family) } {
        AF_INET => {
            let d = unsafe { core::ptr::read_volatile(&(*sk).dst_ip4) };
            if d == 0 {
                return None;
            }
            let d = d.to_ne_bytes();
            addr[..4].copy_from_slice(&d);
            Some((4, addr, d[0] == 127))
        }
        AF_INET6 => {
            let (d0, d1, d2, d3) = unsafe {
                (
                    core::ptr::read_volatile(&(*sk).dst_ip6[0]),
                    core::ptr::read_volatile(&(*sk).dst_ip6[1]),
                    core::ptr::read_volatile(&(*sk).dst_ip6[2]),
                    core::ptr::read_volatile(&(*sk).dst_ip6[3]),
                )
            };
            if d0 | d1 | d2 | d3 == 0 {
                return None;
            }
            addr[..4].copy_from_slice(&d0.to_ne_bytes());
            addr[4..8].copy_from_slice(&d1.to_ne_bytes());
            addr[8..12].copy_from_slice(&d2.to_ne_bytes());
            addr[12..].copy_from_slice(&d3.to_ne_bytes());
            Some((6, addr, is_loopback6(&addr)))
        }
        _ => None,
    }
}

/// `addr` of `family` as the record of a packet of the other family carries it: an IPv4
/// peer as `::ffff:a.b.c.d` (its four bytes first otherwise).
#[inline(always)]
fn mapped(addr: [u8; 16], family: u8) -> [u8; 16] {
    let mut out = [0u8; 16];
    if family == 4 {
        out[10] = 0xff;
        out[11] = 0xff;
        out[12..].copy_from_slice(&addr[..4]);
    } else {
        out[..4].copy_from_slice(&addr[12..]);
    }
    out
}

/// The packet's family, destination (IPv4 in the first four bytes) and whether that is a
/// loopback address; `None` for a packet neither IPv4 nor IPv6.
#[inline(always)]
fn destination(ctx: &SkBuffContext, b0: u8) -> Result<Option<(u8, [u8; 16], bool)>, i64> {
    match b0 >> 4 {
        4 => {
            let daddr: [u8; 4] = ctx.load(16)?;
            let mut addr = [0u8; 16];
            addr[..4].copy_from_slice(&daddr);
            Ok(Some((4, addr, daddr[0] == 127)))
        }
        6 => {
            let addr: [u8; 16] = ctx.load(24)?;
            Ok(Some((6, addr, is_loopback6(&addr))))
        }
        _ => Ok(None),
    }
}

/// [`drop`] of a packet to `addr`, for `reason` (an `opt_level` that is not an option),
/// with the protocol its header names.
#[inline(always)]
fn drop_to(ctx: &SkBuffContext, family: u8, addr: [u8; 16], reason: u16) -> Result<i32, i64> {
    let protocol: u8 = ctx.load(if family == 4 { 9 } else { 6 })?;
    Ok(drop(ctx, family, u32::from(protocol), reason, 0, addr))
}

/// The cgroup of the socket that sent the packet (not of whatever task runs the stack),
/// and its sandbox.
#[inline(always)]
fn packet_sandbox(ctx: &SkBuffContext) -> (u64, Option<&'static SandboxInfo>) {
    let skb = ctx.skb.skb;
    // SAFETY: helpers valid in cgroup_skb programs, taking the program's own context.
    let cgroup_id = unsafe { bpf_skb_cgroup_id(skb) };
    let sandbox = find_sandbox_from(cgroup_id, |level| unsafe {
        bpf_skb_ancestor_cgroup_id(skb, level)
    });
    (cgroup_id, sandbox)
}

/// `::1`, or `::ffff:127.a.b.c` (a dual-stack socket's IPv4 loopback). Byte by byte: the
/// verifier has no `memcmp`.
#[inline(always)]
fn is_loopback6(a: &[u8; 16]) -> bool {
    let mut i = 0;
    while i < 10 {
        if a[i] != 0 {
            return false;
        }
        i += 1;
    }
    if a[10] == 0xff && a[11] == 0xff {
        return a[12] == 127;
    }
    a[10] == 0 && a[11] == 0 && a[12] == 0 && a[13] == 0 && a[14] == 0 && a[15] == 1
}

/// The type of the first IPv4 option that is not padding (131 LSRR, 137 SSRR, 7 RR, 68
/// timestamp, ...), or 0 when it cannot be read.
#[inline(always)]
fn first_ipv4_option(ctx: &SkBuffContext, header_len: usize) -> u16 {
    let mut off = 20usize;
    let mut i = 0;
    while i < 40 {
        if off >= header_len {
            break;
        }
        let Ok(t) = ctx.load::<u8>(off) else {
            break;
        };
        if t != IPOPT_NOOP && t != IPOPT_END {
            return u16::from(t);
        }
        off += 1;
        i += 1;
    }
    0
}

#[inline(always)]
fn drop(
    ctx: &SkBuffContext,
    family: u8,
    protocol: u32,
    level: u16,
    name: u16,
    addr: [u8; 16],
) -> i32 {
    let (cgroup_id, sandbox) = packet_sandbox(ctx);
    let index = sandbox.map_or(0, |sb| sb.index);
    // The task running the stack may not be the sender (retransmits run from timers), so
    // only the socket's owner uid is recorded, and no pid or name.
    let origin = Origin {
        cgroup_id,
        // SAFETY: helper valid in cgroup_skb programs.
        socket_cookie: unsafe { bpf_get_socket_cookie(ctx.as_ptr()) },
        netns_cookie: 0,
        pid: 0,
        uid: ctx.get_socket_uid(),
        gid: 0,
        comm: [0; 16],
    };
    let call = Call {
        hook: hook::SKB_EGRESS,
        family,
        protocol,
        dest: Dest::V4([0; 4]),
        port: 0,
        raw_addr: addr,
        opt_level: level,
        opt_name: name,
    };
    count_deny(index);
    report(&origin, &call, Decided::refused(index, 0));
    DROP
}
