//! `cgroup/recvmsg4|6` and `cgroup/getpeername4|6`: a socket whose DNS was sent to the
//! sandbox's resolver sees replies (and its peer) as coming from the server it asked, so
//! resolvers that check the reply's source (glibc, musl, dig) accept them. These hooks
//! cannot refuse anything: they must return 1.
use aya_ebpf::{macros::cgroup_sock_addr, programs::SockAddrContext};

use crate::decide::restore_source;

#[cgroup_sock_addr(recvmsg4)]
pub fn egress_recvmsg4(ctx: SockAddrContext) -> i32 {
    restore_source(&ctx, 4);
    1
}

#[cgroup_sock_addr(recvmsg6)]
pub fn egress_recvmsg6(ctx: SockAddrContext) -> i32 {
    restore_source(&ctx, 6);
    1
}

#[cgroup_sock_addr(getpeername4)]
pub fn egress_getpeername4(ctx: SockAddrContext) -> i32 {
    restore_source(&ctx, 4);
    1
}

#[cgroup_sock_addr(getpeername6)]
pub fn egress_getpeername6(ctx: SockAddrContext) -> i32 {
    restore_source(&ctx, 6);
    1
}
