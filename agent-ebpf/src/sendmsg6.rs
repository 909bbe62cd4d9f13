//! `cgroup/sendmsg6`: unconnected UDP sends with an IPv6 address, including v4-mapped
//! destinations from dual-stack sockets (judged by the IPv4 policy).
use agent_common::hook;
use aya_ebpf::{macros::cgroup_sock_addr, programs::SockAddrContext};

use crate::decide::{
    decide, ipv6, is_nat64, port, protocol, routed, sends_to_connected_peer, v6_dest, Call,
    RET_ALLOW,
};

#[cgroup_sock_addr(sendmsg6)]
pub fn egress_sendmsg6(ctx: SockAddrContext) -> i32 {
    let port = port(&ctx);
    if sends_to_connected_peer(port) {
        return RET_ALLOW;
    }
    let addr = ipv6(&ctx);
    let protocol = protocol(&ctx);
    let call = Call {
        hook: hook::SENDMSG6,
        family: 6,
        protocol,
        dest: if is_nat64(&addr) {
            // A translator takes it to the IPv4 address it carries, never to loopback
            // (0.0.0.0 so spelled is refused, as unspecified).
            v6_dest(addr)
        } else {
            routed(&ctx, v6_dest(addr), protocol)
        },
        port,
        raw_addr: addr,
        opt_level: 0,
        opt_name: 0,
    };
    decide(&ctx, &call)
}
