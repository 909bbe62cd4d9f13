//! `cgroup/sendmsg4`: unconnected UDP `sendto()`/`sendmsg()` carrying an IPv4 address.
//! Connected UDP sockets are decided at connect4 and do not come here.
use agent_common::hook;
use aya_ebpf::{macros::cgroup_sock_addr, programs::SockAddrContext};

use crate::decide::{decide, ipv4, port, protocol, routed, Call, Dest};

#[cgroup_sock_addr(sendmsg4)]
pub fn egress_sendmsg4(ctx: SockAddrContext) -> i32 {
    let addr = ipv4(&ctx);
    let mut raw_addr = [0u8; 16];
    raw_addr[..4].copy_from_slice(&addr);
    let call = Call {
        hook: hook::SENDMSG4,
        family: 4,
        protocol: protocol(&ctx),
        dest: routed(Dest::V4(addr)),
        port: port(&ctx),
        raw_addr,
        opt_level: 0,
        opt_name: 0,
    };
    decide(&ctx, &call)
}
