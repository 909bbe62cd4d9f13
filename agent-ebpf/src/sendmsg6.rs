//! `cgroup/sendmsg6`: unconnected UDP sends with an IPv6 address, including v4-mapped
//! destinations from dual-stack sockets (judged by the IPv4 policy).
use agent_common::hook;
use aya_ebpf::{macros::cgroup_sock_addr, programs::SockAddrContext};

use crate::decide::{
    decide, ipv6, port, protocol, routed6, sends_to_connected_peer, Call, RET_ALLOW,
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
        dest: routed6(&ctx, addr, protocol),
        port,
        raw_addr: addr,
        opt_level: 0,
        opt_name: 0,
    };
    decide(&ctx, &call)
}
