//! `cgroup/sock_release`: a sandbox socket's redirect entry (its original destination,
//! kept for `getpeername` and for the resolver's answers to look as if the server asked
//! had sent them) goes with the socket. The `ORIG` map all sandboxes share then holds the
//! entries of open sockets only: a sandbox opening and closing sockets to port 53 cannot
//! push out the entries of other sandboxes' queries still waiting for their answers.
use aya_ebpf::{
    helpers::generated::bpf_get_socket_cookie, macros::cgroup_sock, programs::SockContext,
    EbpfContext,
};

use crate::maps::ORIG;

#[cgroup_sock(sock_release)]
pub fn egress_sock_release(ctx: SockContext) -> i32 {
    // SAFETY: helper valid in cgroup_sock programs.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let _ = ORIG.remove(cookie);
    // A release is never refused; 1 = go on.
    1
}
