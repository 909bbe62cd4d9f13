//! `cgroup/bind4|6`: a sandbox may not bind the ports of the daemon's own listeners (the
//! proxy's, the DNS resolvers'), which the kernel redirects its traffic to: bound while
//! the daemon is down (or restarting), they would take that traffic. Other binds are not
//! judged and leave no record.
use agent_common::hook;
use aya_ebpf::{macros::cgroup_sock_addr, programs::SockAddrContext};

use crate::decide::{decide_bind, ipv4, ipv6, port, protocol, v6_dest, Call, Dest};

#[cgroup_sock_addr(bind4)]
pub fn egress_bind4(ctx: SockAddrContext) -> i32 {
    let addr = ipv4(&ctx);
    let mut raw_addr = [0u8; 16];
    raw_addr[..4].copy_from_slice(&addr);
    let call = Call {
        hook: hook::BIND4,
        family: 4,
        protocol: protocol(&ctx),
        dest: Dest::V4(addr),
        port: port(&ctx),
        raw_addr,
        opt_level: 0,
        opt_name: 0,
    };
    decide_bind(&ctx, &call)
}

#[cgroup_sock_addr(bind6)]
pub fn egress_bind6(ctx: SockAddrContext) -> i32 {
    let addr = ipv6(&ctx);
    let call = Call {
        hook: hook::BIND6,
        family: 6,
        protocol: protocol(&ctx),
        dest: v6_dest(addr),
        port: port(&ctx),
        raw_addr: addr,
        opt_level: 0,
        opt_name: 0,
    };
    decide_bind(&ctx, &call)
}
