//! `cgroup/sock_create`: a sandbox may only create TCP and UDP sockets. Raw sockets, ping
//! (ICMP) sockets, MPTCP and the rest never reach a connect or sendmsg hook (a ping
//! socket's `sendto` and anything a raw socket writes bypass them), so they are refused at
//! creation with EPERM. The hook runs for AF_INET and AF_INET6 sockets.
use agent_common::proto;
use aya_ebpf::{macros::cgroup_sock, programs::SockContext, EbpfContext};

use crate::decide::deny_socket;

const SOCK_STREAM: u32 = 1;
const SOCK_DGRAM: u32 = 2;
const AF_INET6: u32 = 10;

#[cgroup_sock(sock_create)]
pub fn egress_sock_create(ctx: SockContext) -> i32 {
    // SAFETY: context pointer from the kernel; 4-byte loads of 4-byte fields.
    let (family, type_, protocol) = unsafe {
        (
            core::ptr::read_volatile(&(*ctx.sock).family),
            core::ptr::read_volatile(&(*ctx.sock).type_),
            core::ptr::read_volatile(&(*ctx.sock).protocol),
        )
    };
    let tcp = type_ == SOCK_STREAM && protocol == u32::from(proto::TCP);
    let udp = type_ == SOCK_DGRAM && protocol == u32::from(proto::UDP);
    if tcp || udp {
        return 1;
    }
    let family = if family == AF_INET6 { 6 } else { 4 };
    deny_socket(ctx.as_ptr(), family, protocol)
}
