//! `cgroup/setsockopt` on each sandbox cgroup: options that make the kernel send a socket's
//! packets somewhere other than the address connect4/6 and sendmsg4/6 judged are refused
//! with EPERM. An IPv4 loose or strict source route (`IP_OPTIONS`) or an IPv6 routing
//! header (`IPV6_RTHDR`, the RFC 2292 `IPV6_2292RTHDR`, and `IPV6_2292PKTOPTIONS`, whose
//! control data may carry one) routes the packet to its first hop or segment, which no hook
//! judged. Any non-empty IP options are refused: a sandbox has no use for them. So are the
//! options that let a socket send from an address that is not the host's
//! (`IP_FREEBIND`, `IP_TRANSPARENT` and their IPv6 forms): a forged source sends the
//! answers to a packet (an ICMP error quoting it, an echoing server) to an address no hook
//! judged. Multicast memberships and source filters are refused too: the kernel announces
//! each one to the link in an IGMP or MLD report of its own (no socket, so no hook sees
//! it) naming the groups and sources the caller chose, a channel out of even a
//! quarantined sandbox. So is a flow label request with trailing control data (which may
//! carry a routing header).
//!
//! The hook runs for every setsockopt from the cgroup except compat (32-bit) syscalls,
//! which the kernel does not pass to it; `cgroup_skb/egress` (skb.rs) drops the packets
//! with source routes themselves, whichever way the option was set (not the kernel's own
//! membership reports, which belong to no socket).
use agent_common::{hook, sockopt};
use aya_ebpf::{macros::cgroup_sockopt, programs::SockoptContext};

use crate::decide::{
    count_deny, find_sandbox, report, Call, Decided, Dest, Origin, RET_ALLOW, RET_DENY,
};

const AF_INET6: u32 = 10;

#[cgroup_sockopt(setsockopt)]
pub fn egress_setsockopt(ctx: SockoptContext) -> i32 {
    // SAFETY: context pointer from the kernel; 4-byte loads of 4-byte fields.
    let (level, optname, optlen) = unsafe {
        (
            core::ptr::read_volatile(&(*ctx.sockopt).level),
            core::ptr::read_volatile(&(*ctx.sockopt).optname),
            core::ptr::read_volatile(&(*ctx.sockopt).optlen),
        )
    };
    if !refused(level, optname, optlen) {
        return RET_ALLOW;
    }
    // SAFETY: `sk` is always set in a setsockopt context (PTR_TO_SOCKET).
    let (family, protocol) = unsafe {
        let sk = (*ctx.sockopt).__bindgen_anon_1.sk;
        (
            core::ptr::read_volatile(&(*sk).family),
            core::ptr::read_volatile(&(*sk).protocol),
        )
    };
    let index = find_sandbox().map_or(0, |sb| sb.index);
    let call = Call {
        hook: hook::SETSOCKOPT,
        family: if family == AF_INET6 { 6 } else { 4 },
        protocol,
        dest: Dest::V4([0; 4]),
        port: 0,
        raw_addr: [0; 16],
        opt_level: level as u16,
        opt_name: optname as u16,
    };
    count_deny(index);
    report(&Origin::task(), &call, Decided::refused(index, 0));
    RET_DENY
}

/// Whether setting `optname` at `level` with `optlen` bytes would install a source route or
/// routing header, allow a source address that is not the host's, or change a multicast
/// membership. A zero length clears the option (or is an error) and stays allowed.
#[inline(always)]
fn refused(level: i32, optname: i32, optlen: i32) -> bool {
    if optlen <= 0 {
        return false;
    }
    let (level, optname) = (level as u32, optname as u32);
    // The protocol-independent `MCAST_*` memberships, at either level.
    let mcast = optname >= u32::from(sockopt::MCAST_JOIN_GROUP)
        && optname <= u32::from(sockopt::MCAST_MSFILTER);
    if level == u32::from(sockopt::SOL_IP) {
        optname == u32::from(sockopt::IP_OPTIONS)
            || optname == u32::from(sockopt::IP_RETOPTS)
            || optname == u32::from(sockopt::IP_FREEBIND)
            || optname == u32::from(sockopt::IP_TRANSPARENT)
            || (optname >= u32::from(sockopt::IP_ADD_MEMBERSHIP)
                && optname <= u32::from(sockopt::IP_MSFILTER))
            || mcast
    } else if level == u32::from(sockopt::SOL_IPV6) {
        optname == u32::from(sockopt::IPV6_RTHDR)
            || optname == u32::from(sockopt::IPV6_2292RTHDR)
            || optname == u32::from(sockopt::IPV6_2292PKTOPTIONS)
            || optname == u32::from(sockopt::IPV6_NEXTHOP)
            || optname == u32::from(sockopt::IPV6_TRANSPARENT)
            || optname == u32::from(sockopt::IPV6_FREEBIND)
            || optname == u32::from(sockopt::IPV6_ADD_MEMBERSHIP)
            || optname == u32::from(sockopt::IPV6_DROP_MEMBERSHIP)
            || optname == u32::from(sockopt::IPV6_JOIN_ANYCAST)
            || optname == u32::from(sockopt::IPV6_LEAVE_ANYCAST)
            || (optname == u32::from(sockopt::IPV6_FLOWLABEL_MGR)
                && optlen > i32::from(sockopt::FLOWLABEL_REQ_LEN))
            || mcast
    } else {
        false
    }
}
