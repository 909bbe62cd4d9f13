//! `cgroup/sock_release`: the `BY_PEER` entry of a connection to the proxy that the proxy
//! never took (refused while it was away, or closed before it accepted) goes with its
//! socket: nothing else could take it for the sandbox's, nor push others' out by
//! connecting and closing in a loop. (The socket's own storage, its original destination
//! and `BY_PEER` key, is freed by the kernel with it.)
use aya_ebpf::{macros::cgroup_sock, programs::SockContext, EbpfContext};

use crate::maps::{BY_PEER, SOCK_PEER};

#[cgroup_sock(sock_release)]
pub fn egress_sock_release(ctx: SockContext) -> i32 {
    // The context of a cgroup_sock program is the socket.
    if let Some(key) = SOCK_PEER.get(ctx.as_ptr()) {
        // Only this socket's own entry: the proxy may have taken it, and the key been
        // reused since.
        // SAFETY: helper valid in cgroup_sock programs.
        let cookie = unsafe { aya_ebpf::helpers::generated::bpf_get_socket_cookie(ctx.as_ptr()) };
        // SAFETY: only a field is read.
        let own = unsafe { BY_PEER.get(key) }.is_some_and(|o| o.socket_cookie == cookie);
        if own {
            let _ = BY_PEER.remove(key);
        }
    }
    // A release is never refused; 1 = go on.
    1
}
