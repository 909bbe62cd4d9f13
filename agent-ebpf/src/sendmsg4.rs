//! `cgroup/sendmsg4`: unconnected UDP `sendto()`/`sendmsg()` carrying an IPv4 address.
//! Connected UDP sockets are decided at connect4 (connect6 for a dual-stack socket); their
//! sends come here only with control data, and no address (see
//! [`sends_to_connected_peer`]), or, from a dual-stack socket connected to an IPv4-mapped
//! peer, with that peer's address (see [`sends_to_mapped_peer`]).
use agent_common::hook;
use aya_ebpf::{macros::cgroup_sock_addr, programs::SockAddrContext};

use crate::decide::{
    decide, ipv4, port, protocol, routed, sends_to_connected_peer, sends_to_mapped_peer, Call,
    Dest, RET_ALLOW,
};

#[cgroup_sock_addr(sendmsg4)]
pub fn egress_sendmsg4(ctx: SockAddrContext) -> i32 {
    let port = port(&ctx);
    if sends_to_connected_peer(port) {
        return RET_ALLOW;
    }
    let addr = ipv4(&ctx);
    if sends_to_mapped_peer(&ctx, addr, port) {
        return RET_ALLOW;
    }
    let mut raw_addr = [0u8; 16];
    raw_addr[..4].copy_from_slice(&addr);
    let protocol = protocol(&ctx);
    let call = Call {
        hook: hook::SENDMSG4,
        family: 4,
        protocol,
        dest: routed(&ctx, Dest::V4(addr), protocol),
        port,
        raw_addr,
        opt_level: 0,
        opt_name: 0,
    };
    decide(&ctx, &call)
}
