//! `cgroup/connect6`: every IPv6 `connect()` from a sandbox. An AF_INET6 socket connecting
//! to `::ffff:a.b.c.d` reaches this hook and never connect4, so mapped destinations are
//! judged by the IPv4 policy (see `decide::v6_dest`).
use agent_common::hook;
use aya_ebpf::{macros::cgroup_sock_addr, programs::SockAddrContext};

use crate::decide::{decide, ipv6, port, protocol, routed6, unspecified_v6_target, Call};

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
            routed6(&ctx, addr, protocol)
        },
        port: port(&ctx),
        raw_addr: addr,
        opt_level: 0,
        opt_name: 0,
    };
    decide(&ctx, &call)
}
