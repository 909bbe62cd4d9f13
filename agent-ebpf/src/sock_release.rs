//! `cgroup/sock_release`: a sandbox socket's redirect entry (its original destination,
//! kept for `getpeername` and for the resolver's answers to look as if the server asked
//! had sent them) goes with the socket. The `ORIG` map all sandboxes share then holds the
//! entries of open sockets only: a sandbox opening and closing sockets to port 53 cannot
//! push out the entries of other sandboxes' queries still waiting for their answers.
//! So does the `BY_PEER` entry of a connection to the proxy that the proxy never took
//! (refused while it was away, or closed before it accepted): nothing else could take it
//! for the sandbox's, nor push others' out by connecting and closing in a loop.
use aya_ebpf::{
    helpers::generated::bpf_get_socket_cookie, macros::cgroup_sock, programs::SockContext,
    EbpfContext,
};

use crate::{
    decide::forget_orig,
    maps::{BY_PEER, PEER_OF},
};

#[cgroup_sock(sock_release)]
pub fn egress_sock_release(ctx: SockContext) -> i32 {
    // SAFETY: helper valid in cgroup_sock programs.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    forget_orig(cookie);
    // SAFETY: the value is copied out.
    if let Some(key) = unsafe { PEER_OF.get(cookie) }.copied() {
        // Only this socket's own entry: the proxy may have taken it, and the key been
        // reused since.
        // SAFETY: only a field is read.
        let own = unsafe { BY_PEER.get(key) }.is_some_and(|o| o.socket_cookie == cookie);
        if own {
            let _ = BY_PEER.remove(key);
        }
        let _ = PEER_OF.remove(cookie);
    }
    // A release is never refused; 1 = go on.
    1
}
