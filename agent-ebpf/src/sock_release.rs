//! `cgroup/sock_release`: the `BY_PEER` entry of a connection to the proxy that the proxy
//! never took (closed before it accepted, or left when the connection was over) goes with
//! its socket: nothing else could take it for the sandbox's, nor push others' out by
//! connecting and closing in a loop. (The socket's own storage, its original destination
//! and `BY_PEER` key, is freed by the kernel with it.)
use aya_ebpf::{macros::cgroup_sock, programs::SockContext, EbpfContext};

use crate::{decide::forget_own_peer, maps::SOCK_STATE};

#[cgroup_sock(sock_release)]
pub fn egress_sock_release(ctx: SockContext) -> i32 {
    // The context of a cgroup_sock program is the socket.
    if let Some(state) = SOCK_STATE.get(ctx.as_ptr()) {
        if state.has_peer == 1 {
            forget_own_peer(state.peer, ctx.as_ptr());
        }
    }
    // A release is never refused; 1 = go on.
    1
}
