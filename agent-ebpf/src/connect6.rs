//! `cgroup/connect6`: every IPv6 `connect()` from a sandbox. An AF_INET6 socket connecting
//! to `::ffff:a.b.c.d` reaches this hook and never connect4, so mapped destinations are
//! judged by the IPv4 policy (see `decide::v6_dest`).
use agent_common::hook;
use aya_ebpf::{macros::cgroup_sock_addr, programs::SockAddrContext};

use crate::decide::{
    decide, ipv6, is_nat64, port, protocol, routed, unspecified_v6_target, v6_dest, Call,
};

#[cgroup_sock_addr(connect6)]
pub fn egress_connect6(ctx: SockAddrContext) -> i32 {
    let addr = ipv6(&ctx);
    let protocol = protocol(&ctx);
    let call = Call {
        hook: hook::CONNECT6,
        family: 6,
        protocol,
        dest: if addr == [0u8; 16] {
            unspecified_v6_target(&ctx)
        } else {
            if is_nat64(&addr) {
                // A translator takes it to the IPv4 address it carries, never to loopback
                // (0.0.0.0 so spelled is refused, as unspecified).
                v6_dest(addr)
            } else {
                routed(&ctx, v6_dest(addr), protocol)
            }
        },
        port: port(&ctx),
        raw_addr: addr,
        opt_level: 0,
        opt_name: 0,
    };
    decide(&ctx, &call)
}
