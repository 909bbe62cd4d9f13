//! `cgroup/connect4`: every IPv4 `connect()` from a sandbox (TCP, and UDP sockets being
//! connected, which is how glibc's resolver sends). A denied call fails with EPERM.
use agent_common::hook;
use aya_ebpf::{macros::cgroup_sock_addr, programs::SockAddrContext};

use crate::decide::{decide, ipv4, port, protocol, routed, Call, Dest};

#[cgroup_sock_addr(connect4)]
pub fn egress_connect4(ctx: SockAddrContext) -> i32 {
    let addr = ipv4(&ctx);
    let mut raw_addr = [0u8; 16];
    raw_addr[..4].copy_from_slice(&addr);
    let protocol = protocol(&ctx);
    let call = Call {
        hook: hook::CONNECT4,
        family: 4,
        protocol,
        dest: routed(&ctx, Dest::V4(addr), protocol),
        port: port(&ctx),
        raw_addr,
        opt_level: 0,
        opt_name: 0,
    };
    decide(&ctx, &call)
}
